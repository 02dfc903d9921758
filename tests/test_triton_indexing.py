"""Index arithmetic and device handling of the Triton launchers, checked without a GPU.

Triton computes i32 * i32 in i32 and wraps silently (so does its interpreter, which these tests use): an offset that
can pass 2^31 at sizes that fit one GPU is computed through the kernels' int64 helpers, tested here on the exact
values that wrap. The launchers run under their input's CUDA device (checked with a recording stand-in for
torch.cuda.device, since the CPU has no second device).
"""

from __future__ import annotations

import types

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from flowgmm_fast.kernels import _common, coupling, gmm, logit, squeeze
from flowgmm_fast.kernels._common import partial_row, wide_index
from flowgmm_fast.kernels.coupling import _tile_index


@triton.jit
def _index_probe(out_ptr, b, n, p, C, pc, ps, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
    tl.store(out_ptr, partial_row(b, n, p) * C)
    _, _, off = _tile_index(pc, ps, C, S, BLOCK_C, BLOCK_S, IDX64)
    tl.store(out_ptr + 1 + tl.arange(0, BLOCK_C)[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :], off)


def _probe(device, b, n, p, c, pc, ps, s, idx64, block_c=2, block_s=4):
    out = torch.zeros(1 + block_c * block_s, dtype=torch.int64, device=device)
    _index_probe[(1,)](out, b, n, p, c, pc, ps, s, BLOCK_C=block_c, BLOCK_S=block_s, IDX64=idx64)
    return out[0].item(), out[1:].view(block_c, block_s).cpu()


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_gscale_partial_row_is_int64():
    # the coupling backward's gscale partial row of sample b, spatial tile p, times C: for tabular x of
    # (2_097_152 + 1, 1024) fp32 (8.6 GB, fits an H200) the last sample's (b * tiles + p) * C is 2^31, one past int32
    b, tiles, p, c = 2 ** 21, 1, 0, 1024
    row, _ = _probe(_device(), b, tiles, p, c, 0, 0, 1, True)
    assert row == (b * tiles + p) * c == 2 ** 31


@pytest.mark.parametrize("idx64", [True, False])
def test_tile_offsets_in_one_sample(idx64):
    # channel tile pc of 2 channels, positions tile ps of 4, S = 2^11 positions: offsets c * S + sp reach 2^32
    pc, ps, s, block_c, block_s = 2 ** 20, 3, 2 ** 11, 2, 4
    c_total = pc * block_c + block_c
    _, off = _probe(_device(), 0, 1, 0, c_total, pc, ps, s, idx64, block_c, block_s)
    ch = torch.arange(block_c, dtype=torch.int64)[:, None] + pc * block_c
    sp = torch.arange(block_s, dtype=torch.int64)[None, :] + ps * block_s
    want = ch * s + sp
    if idx64:
        torch.testing.assert_close(off, want)
        assert wide_index(c_total * s)  # what the launcher passes for this plane
    else:  # why the flag exists: the same arithmetic in int32 wraps (this is Triton's behaviour, not ours)
        assert not torch.equal(off, want)


def test_wide_index_threshold():
    assert not wide_index(3 * 32 * 32, 12 * 16 * 16)
    assert not wide_index(_common.WIDE_INDEX - 1)
    assert wide_index(_common.WIDE_INDEX)
    assert wide_index(10, 2 ** 31)


LAUNCHERS = [coupling.coupling_forward, coupling.coupling_backward, gmm.gmm_forward, gmm.gmm_backward,
             logit.logit_forward, logit.logit_backward, squeeze.squeeze2x2]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda f: f.__name__)
def test_every_launcher_runs_under_its_input_device(launcher):
    assert getattr(launcher, "on_input_device", False), launcher.__name__


def test_on_input_device_enters_the_tensor_device(monkeypatch):
    events = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", Recorder)

    @_common.on_input_device
    def launch(x, y, flag=False):
        events.append(("launch", x.device, y, flag))
        return "ok"

    on_cuda1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    assert launch(on_cuda1, 5, flag=True) == "ok"
    cuda1 = torch.device("cuda", 1)
    assert events == [("enter", cuda1), ("launch", cuda1, 5, True), ("exit", cuda1)]
    events.clear()
    assert launch(torch.zeros(1), 6) == "ok"  # CPU (the interpreter): no CUDA device is touched
    assert events == [("launch", torch.device("cpu"), 6, False)]


def test_grid_limit_is_a_clear_error():
    _common.check_grid((10 ** 6, 65535, 1), "coupling")
    with pytest.raises(ValueError, match="grid axis 2"):
        _common.check_grid((1, 1, 65536), "coupling")


def test_gmm_launch_geometry_on_an_h200_sized_gpu(monkeypatch):
    """The GMM launch rules at the issue's sizes with 132 SMs (an H200), checked without a GPU: warps follow the
    accumulator tile (no 8 warps repeating the MMAs of a 16 x 16 tile) and the parameter-gradient grid has at least
    four programs per SM when the rows allow it."""
    monkeypatch.setattr(gmm, "_sm_count", lambda index: 132)
    monkeypatch.setattr(gmm, "_tf32_capable", lambda index: True)
    cuda = torch.device("cuda", 0)
    cfg = gmm._config(4096, 10, False, cuda, 3072)
    assert (cfg["BLOCK_B"], cfg["BLOCK_K"], cfg["num_warps"]) == (16, 16, 2)
    assert cfg["PRECISION"] == "tf32x3"
    assert gmm._config(100_000, 10, False, cuda, 8)["BLOCK_B"] == 64
    assert gmm._config(100_000, 10, False, cuda, 8)["num_warps"] == 8
    assert gmm._config(4096, 100, True, cuda, 3072)["num_warps"] == 8  # 16 x 128
    assert gmm._config(4096, 32, False, cuda, 3072)["num_warps"] == 4  # 16 x 32 after halving
    n_d = triton.cdiv(3072, 32)
    splits = gmm._param_splits(4096 // 16, n_d, cuda)
    assert n_d * splits >= 4 * 132 and splits == 6
    assert gmm._param_splits(3, n_d, cuda) == 3  # never more splits than row blocks
    assert gmm._param_splits(1000, 1, torch.device("cpu")) == 256
    assert [gmm._num_warps(b, k) for b, k in ((16, 16), (32, 16), (64, 16), (16, 128), (64, 128))] == [2, 4, 8, 8, 8]
