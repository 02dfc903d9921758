"""Test configuration shared by every test file.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter; TRITON_INTERPRET must be set before
triton is first imported, so it is set here, in pytest_configure, before any test module is collected.
"""

import os


def pytest_configure(config):
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
