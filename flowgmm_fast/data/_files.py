"""Reading user-supplied files without unpickling them: ``.npz`` archives are checked to be zip files and opened with
``allow_pickle=False`` (object arrays are refused), so a crafted file cannot run code. CIFAR-10's pickled batches, the
one pickle format the data readers accept, go through the restricted unpickler of :mod:`flowgmm_fast.data.images`."""

from __future__ import annotations

import os
import zipfile

import numpy as np


def open_npz(path: str | os.PathLike, what: str, error: type[Exception] = ValueError):
    """``np.load(path, allow_pickle=False)`` for an ``.npz`` archive (use as a context manager); raises ``error``
    naming ``what`` and the file when it is not a zip archive (numpy would try it as a pickle and report "pickled
    (object) data")."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(8)
        kind = "a .npy array" if head.startswith(b"\x93NUMPY") else "a pickle" if head[:1] == b"\x80" else \
            "empty" if not head else f"starting with bytes {head!r}"
        raise error(f"{what} {str(path)!r} is not an .npz archive (the zip file numpy.savez writes); it is {kind}")
    return np.load(path, allow_pickle=False)
