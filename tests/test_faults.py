"""Fault tests: what a careful user breaks on purpose -- corrupt and crafted checkpoints, NaN/inf stops, signals, files
left by killed writers, resumes with changed flags, malicious data files -- and what must hold afterwards.

Small CPU models (the tiny RealNVP of test_training.py) keep every test to seconds.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flowgmm_fast.data import ImageData, LabelSplitError, load_image_dataset, load_label_split
from flowgmm_fast.data import tabular as T
from flowgmm_fast.data.images import read_cifar_batch
from flowgmm_fast.training import (CheckpointError, NonFiniteLossError, NonFiniteStateError, ResumeArgumentError,
                                   load_checkpoint, read_checkpoint, save_checkpoint, seed_everything)
from helpers import load_experiment
from test_training import make_trainer, recording_loss, tiny_batches, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(tmp_path) -> Path:
    seed_everything(0)
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, labels, _ = next(iter(tiny_batches()(0)))
    model(x, labels).nll.mean().backward()
    opt.step()  # Adam state (exp_avg, exp_avg_sq) in the file
    return save_checkpoint(tmp_path / "c.pt", model, step=3, epoch=0.75, optimizers={"flow": opt},
                           extra={"args": {"lr": 1e-3}})


class _Marker:
    """Unpickling this object creates the file ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("where", ["middle", "header-hash", "truncated", "empty", "appended"])
def test_corrupt_checkpoint_bytes_raise_checkpoint_error(tmp_path, where):
    path = _checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    if where == "middle":  # 64 flipped bytes in the payload (the reproducer hit Adam's exp_avg)
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    elif where == "header-hash":
        i = data.index(b"sha256=") + 7
        data[i] = ord("0") if data[i] != ord("0") else ord("1")
    elif where == "truncated":
        data = data[: len(data) * 2 // 3]
    elif where == "empty":
        data = bytearray()
    else:
        data += b"\0" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_checkpoint(path, tiny_model(), optimizers={"flow": torch.optim.Adam(tiny_model().parameters())})


def test_checkpoint_integrity_covers_every_payload_byte(tmp_path):
    """Any single flipped bit of the payload is detected (sampled positions across the file)."""
    path = _checkpoint(tmp_path)
    clean = path.read_bytes()
    start = clean.index(b"\n") + 1
    for pos in np.linspace(start, len(clean) - 1, 25).astype(int):
        data = bytearray(clean)
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="corrupt"):
            read_checkpoint(path)


# ----------------------------------------------------------------------------------------------- weights_only
def test_crafted_checkpoint_with_valid_checksum_cannot_run_code(tmp_path):
    import hashlib
    import io

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"format": 2, "model": _Marker(str(marker))}, buf)
    payload = buf.getvalue()
    header = f"FLOWGMM-CKPT 2 sha256={hashlib.sha256(payload).hexdigest()}\n".encode()
    path = tmp_path / "evil.pt"
    path.write_bytes(header + payload)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path, tiny_model())
    assert not marker.exists(), "unpickling the checkpoint ran code"


def test_crafted_format1_checkpoint_cannot_run_code(tmp_path):
    """A bare torch.save file (the old format, no header) is read weights-only too."""
    marker = tmp_path / "pwned"
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "model": _Marker(str(marker))}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, tiny_model())
    assert not marker.exists()


def test_format1_checkpoint_still_loads_weights_only(tmp_path):
    """Checkpoints written before the checksum (numpy RNG state tuples inside) still resume."""
    seed_everything(0)
    model = tiny_model()
    import random

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"format": 1, "model": model.flow.state_dict(), "prior": model.prior.state_dict(), "step": 5,
                "epoch": 1.0, "optimizers": {}, "schedulers": {}, "rng": [state], "extra": {}}, tmp_path / "v1.pt")
    expected = np.random.get_state()[1][:4].copy()
    np.random.seed(123)
    other = tiny_model()
    assert load_checkpoint(tmp_path / "v1.pt", other)["step"] == 5
    assert np.array_equal(np.random.get_state()[1][:4], expected)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n


def test_save_rejects_content_a_weights_only_load_cannot_rebuild(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['path'\] is a PosixPath"):
        save_checkpoint(tmp_path / "c.pt", tiny_model(), step=0, epoch=0, extra={"path": tmp_path})
    assert not (tmp_path / "c.pt").exists()


# ----------------------------------------------------------------------------------------------- NaN / inf stops
def _blow_up_at(step: int, lr: float):
    """The recording loss, setting every learning rate to ``lr`` just before the update of ``step``."""
    inner = recording_loss([])

    def compute(batch, trainer):
        if trainer.step + 1 == step:
            for opt in trainer.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr
        return inner(batch, trainer)
    return compute


@pytest.mark.parametrize("lr", [1e6, 1e30, math.inf])
def test_nan_stop_keeps_a_checkpoint_that_evaluates_to_a_finite_nll(tmp_path, lr):
    """The update of step 6 (a checkpoint step) uses a huge learning rate. The loss of step 6 was computed before
    it and is finite, so a checkpoint written right after the update would hold inf parameters or parameters whose
    NLL is inf; the kept checkpoint must be an earlier one that evaluates to a finite NLL."""
    trainer = make_trainer(tmp_path)
    with pytest.raises((NonFiniteLossError, NonFiniteStateError)):
        trainer.fit(tiny_batches(), _blow_up_at(6, lr), max_steps=10, log_every=1, save_every=2)
    ckpt = read_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 4
    model = tiny_model()
    load_checkpoint(tmp_path / "last.pt", model)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    model.eval()
    x, labels, _ = next(iter(tiny_batches(seed=5)(0)))
    with torch.no_grad():
        assert torch.isfinite(model(x, labels).nll).all()


def test_non_finite_buffer_is_never_checkpointed(tmp_path):
    """A finite loss with an overflowed batch-norm running variance: the save refuses, the old file stays."""
    trainer = make_trainer(tmp_path)
    trainer.fit(tiny_batches(), recording_loss([]), max_steps=2, log_every=1)
    before = (tmp_path / "last.pt").read_bytes()
    bn = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(math.inf)
    with pytest.raises(NonFiniteStateError, match="running_var"):
        trainer.save()
    assert (tmp_path / "last.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------------- signals
def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path):
    trainer = make_trainer(tmp_path)
    inner = recording_loss([])

    def terminated(batch, tr):
        if tr.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill` and batch schedulers send, during step 3
        return inner(batch, tr)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(tiny_batches(), terminated, max_steps=10, log_every=5)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored


def test_second_sigterm_stops_at_once_without_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    inner = recording_loss([])

    def twice(batch, tr):
        if tr.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(batch, tr)

    with pytest.raises(SystemExit):
        trainer.fit(tiny_batches(), twice, max_steps=10, log_every=5)
    assert not (tmp_path / "last.pt").exists()


# ----------------------------------------------------------------------------------------------- killed writers
def test_stale_temporary_checkpoint_files_are_removed_on_start(tmp_path):
    for name in (".last.pt.abc123.tmp", ".last.pt.zz.tmp"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    keep = [tmp_path / ".other.pt.x.tmp", tmp_path / "last.pt.tmp", tmp_path / "notes.txt"]
    for p in keep:
        p.write_text("not ours")
    trainer = make_trainer(tmp_path)
    trainer.fit(tiny_batches(), recording_loss([]), max_steps=1, log_every=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt"] + [p.name for p in keep])


# ----------------------------------------------------------------------------------------------- resume flags
def _tabular_run(tmp_path, *extra):
    x = np.random.RandomState(0).randn(60, 4).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    T.save_features(str(tmp_path / "f.npz"), x, y, x[:20], y[:20])
    return ["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--num-labeled", "6", "--epochs", "4",
            "--batch-size", "16", "--hidden-dim", "8", "--num-coupling-layers", "2", "--no-progress",
            "--run-dir", str(tmp_path / "run"), *extra]


def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path, capsys):
    script = load_experiment("train_semisup_flowgmm_tabular")
    script.main(_tabular_run(tmp_path, "--lr", "1e-3", "--stop-at", "4"))
    saved = read_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["schedulers"]["flow"]["base_lrs"] == [1e-3]
    capsys.readouterr()
    script.main(_tabular_run(tmp_path, "--lr", "2e-4", "--resume", "--stop-at", "5"))
    assert "resume: changed --lr 0.001 -> 0.0002" in capsys.readouterr().out
    after = read_checkpoint(tmp_path / "run" / "last.pt")
    assert after["step"] == 5 and after["extra"]["args"]["lr"] == 2e-4
    assert after["schedulers"]["flow"]["base_lrs"] == [2e-4]
    lr_now = after["optimizers"]["flow"]["param_groups"][0]["lr"]
    factor = saved["optimizers"]["flow"]["param_groups"][0]["lr"] / 1e-3
    assert 0 < lr_now < 2e-4 * factor  # the new base under the same cosine schedule, one step further


def test_resume_without_flags_keeps_the_saved_values(tmp_path):
    script = load_experiment("train_semisup_flowgmm_tabular")
    script.main(_tabular_run(tmp_path, "--lr", "5e-4", "--max-grad-norm", "7", "--stop-at", "3"))
    args = ["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--num-labeled", "6", "--no-progress",
            "--run-dir", str(tmp_path / "run"), "--resume", "--stop-at", "4"]
    script.main(args)  # a shorter command line: lr, max-grad-norm, sizes come from the checkpoint, not defaults
    saved = read_checkpoint(tmp_path / "run" / "last.pt")["extra"]["args"]
    assert saved["lr"] == 5e-4 and saved["max_grad_norm"] == 7.0 and saved["hidden_dim"] == 8


def test_resume_refuses_to_change_what_defines_the_state(tmp_path):
    script = load_experiment("train_semisup_flowgmm_tabular")
    script.main(_tabular_run(tmp_path, "--stop-at", "2"))
    with pytest.raises(ResumeArgumentError, match=r"--hidden-dim \(checkpoint 8, command line 16\)"):
        script.main(_tabular_run(tmp_path, "--resume", "--hidden-dim", "16"))


# ----------------------------------------------------------------------------------------------- data files
def _mnist_like(n=40):
    labels = torch.arange(n) % 10
    return ImageData(torch.zeros(n, 1, 28, 28, dtype=torch.uint8), labels, "mnist")


def test_one_class_label_split_is_refused(tmp_path):
    data = _mnist_like()
    path = tmp_path / "one.npz"
    np.savez(path, labeled_indices=np.array([0, 10, 20, 30]))  # all class 0
    with pytest.raises(LabelSplitError, match="only class '0'"):
        load_label_split(path, data)
    with pytest.raises(ValueError, match="labeled_idx must label examples of at least 2 classes"):
        T.semisup_labels(np.array([0, 1, 0, 1]), [0, 2])


@pytest.mark.parametrize("content", [b"\x80\x04K\x01.", b"\x93NUMPY\x01\x00", b"", b"labeled_indices 1 2 3\n"])
def test_non_zip_npz_label_file_gets_a_clear_error(tmp_path, content):
    path = tmp_path / "split.npz"
    path.write_bytes(content)
    with pytest.raises(LabelSplitError, match="is not an .npz archive"):
        load_label_split(path, _mnist_like())
    with pytest.raises(ValueError, match="is not an .npz archive"):
        T.load_split(str(path))


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "split.npz"
    np.savez(path, labeled_indices=np.array([_Marker(str(marker))], dtype=object))
    assert zipfile.is_zipfile(path)
    with pytest.raises(LabelSplitError):
        load_label_split(path, _mnist_like())
    assert not marker.exists()


def _cifar_dir(root: Path, entry) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


def test_cifar_batches_go_through_the_restricted_unpickler(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": _Marker(str(marker))}
    root = _cifar_dir(tmp_path / "evil", evil)
    with pytest.raises(ValueError, match=r"global \S*open is not allowed"):
        load_image_dataset("cifar10", root, train=True)
    assert not marker.exists()
    good = {"batch_label": "b", "data": np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072), "labels": [3, 7],
            "filenames": ["a.png", "b.png"]}
    for protocol in (2, 4, 5):
        path = tmp_path / f"batch{protocol}"
        with open(path, "wb") as f:
            pickle.dump(good, f, protocol=protocol)
        got = read_cifar_batch(path)
        assert got["labels"] == [3, 7] and np.array_equal(got["data"], good["data"])


def test_cifar_batch_holding_an_object_array_is_refused(tmp_path):
    path = tmp_path / "batch"
    with open(path, "wb") as f:
        pickle.dump({"data": np.array([1, "a"], dtype=object), "labels": [0]}, f)
    with pytest.raises(ValueError, match="cannot be read safely|entry 'data'"):
        read_cifar_batch(path)


# ----------------------------------------------------------------------------------------------- no pickle paths
def test_no_code_path_unpickles_a_user_file():
    """Source audit: the only pickle loads are the restricted CIFAR unpickler; torch.load is weights-only; np.load
    goes through the zip check with allow_pickle=False. (A new loader must keep to these rules or extend the audit.)"""
    offences = []
    for folder in ("flowgmm_fast", "experiments", "benchmarks", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            rel = path.relative_to(ROOT)
            for line_no, line in enumerate(text.splitlines(), 1):
                code = line.split("#", 1)[0]
                if "pickle.load(" in code or "pickle.loads(" in code or "allow_pickle=True" in code \
                        or "weights_only=False" in code or "joblib.load" in code:
                    offences.append(f"{rel}:{line_no}: {line.strip()}")
                if "torch.load(" in code and "weights_only=True" not in code:
                    offences.append(f"{rel}:{line_no}: {line.strip()}")
                if "np.load(" in code and str(rel) != os.path.join("flowgmm_fast", "data", "_files.py"):
                    offences.append(f"{rel}:{line_no}: {line.strip()}")
    assert not offences, "unsafe loads:\n" + "\n".join(offences)


def test_checkpoint_header_is_read_as_written(tmp_path):
    path = _checkpoint(tmp_path)
    head = path.read_bytes()[:100].split(b"\n")[0]
    assert head.startswith(b"FLOWGMM-CKPT 2 sha256=") and len(head) == len(b"FLOWGMM-CKPT 2 sha256=") + 64
