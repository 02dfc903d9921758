"""Backprop by inversion (``invertible_backprop=True``) against standard autograd: peak training-step memory and step
time across depth and batch size, the drift of the rebuilt inputs and of the gradients per depth, and a batch that
fits a fixed memory budget in one mode only.

Parts (``--parts``, default all of them):
  memory  one FRESH process per (config, mode, size): model and Adam built, Adam's state allocated (zero gradients,
          one step), a forward/backward at batch 2 (one-time set-up: kernels, thread pools), then one training step
          (forward, prior NLL, backward, grad-norm clip, Adam). CPU: the peak
          resident size during the step above the resident size just before it (Linux VmHWM, reset through
          /proc/self/clear_refs; glibc's mmap threshold pinned at 64 KiB so freed tensors leave the process at
          once). CUDA: torch.cuda.max_memory_allocated above memory_allocated before the step. Three gradient
          policies: ``none`` (zero_grad(set_to_none=True), the Trainer's default: the gradients are allocated inside
          the step and counted), ``kept`` (gradient buffers allocated before the step, zeroed in place: the step's
          figure is then activations and workspace only -- what the mode changes) and ``fused`` (the Trainer's
          ``step_in_backward=True``, :class:`flowgmm_fast.training.StepInBackward`: each parameter stepped by Adam
          inside the backward pass and its gradient freed at once; no clipping, which that policy cannot do).
  time    standard and invertible steps of two identically initialised models, interleaved in one process (order
          shuffled per pair); the figure is the median of the per-pair ratios t_inv / t_std.
  drift   float32 training-mode gradients of standard autograd and of invertible mode (no checkpoint, and
          checkpoint_every=4) against float64 standard autograd, and the error of the rebuilt inputs
          (:class:`flowgmm_fast.nn.DriftProbe`), per depth; at initialisation and after 100 Adam steps.
  budget  a fresh process per mode under an address-space limit (RLIMIT_AS = the process's size after setup +
          the budget): two training steps at a batch whose standard step needs more than the budget.
  time-fused  the ``fused`` policy's cost: invertible-mode steps with the Trainer's default step and with Adam
          stepped per parameter inside the backward pass, interleaved in one process; median of t_fused / t_none.

Configs: ``mnist`` is the paper's MNIST RealNVP (2 scales, mid_channels 64, 8 blocks; 1x28x28; 10 classes) at
batch 16/32/64; ``tabular`` is RealNVPTabular with the UCI settings of REFERENCE.md (hidden 256, 1 hidden layer,
dropout 0.5) on 64 features, batch 5000 (the paper's tabular batch), with 4, 8, 16 and 32 couplings.
``--suite cpu-targets`` measures the issue's targets only (a subset of ``cpu``, for a loaded shared CPU);
``--suite cpu-fused`` only the tabular depth sweep under the ``fused`` gradient policy;
``--suite smoke`` runs tiny versions of everything in seconds (tests/test_benchmarks.py).

Writes ``benchmarks/results/invertible/invertible_<device>_<date>_<commit>.json``, ``invertible_<device>.png`` and
``invertible_<device>.md`` (tables) next to it, and rewrites README.md's block between ``<!-- invertible:start -->``
and ``<!-- invertible:end -->`` (the targets and figures). ``--render FILE`` does the same from an existing results
file without measuring. Usage: ``python -m benchmarks.bench_invertible [--suite cpu] [--render FILE]``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import flowgmm_fast
from flowgmm_fast import FlowGMM
from flowgmm_fast.nn import DriftProbe, GaussianMixture, RealNVP, RealNVPTabular
from flowgmm_fast.training import StepInBackward

from . import common
from .report import _md_table

RESULTS_DIR = common.RESULTS_DIR / "invertible"
MODES = ("standard", "invertible")
GRAD_POLICIES = ("kept", "none", "fused")
POLICY_NOTES = {"fused": ": each freed inside the backward, Trainer(step_in_backward=True)"}
POLICY_TEXT = ("gradient policies: `kept` = gradient buffers allocated before the step (the figure is activations and "
               "workspace), `none` = allocated inside the step (the Trainer's default zero_grad(set_to_none=True)), "
               "`fused` = each parameter stepped and its gradient freed inside the backward pass (the Trainer's "
               "step_in_backward=True, no clipping)")


# --------------------------------------------------------------------------------------------------------- models
def build(spec: dict) -> FlowGMM:
    """The FlowGMM of a spec: {"kind": "image", "mid", "blocks", "scales", "shape"} or {"kind": "tabular", "dim",
    "couplings", "hidden"}; weights from seed 0."""
    torch.manual_seed(0)
    if spec["kind"] == "image":
        c, h, w = spec["shape"]
        flow = RealNVP(c, spec.get("scales", 2), spec["mid"], spec["blocks"], dequantize=True)
        return FlowGMM(flow, GaussianMixture(10, c * h * w), event_shape=tuple(spec["shape"]))
    flow = RealNVPTabular(spec["dim"], spec["couplings"], spec["hidden"], num_layers=1, dropout=0.5)
    return FlowGMM(flow, GaussianMixture(4, spec["dim"], means_init="tabular", std=1.3133))


def data(spec: dict, batch: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if spec["kind"] == "image":
        x = torch.randint(0, 256, (batch, *spec["shape"]), generator=g).float() / 256
        k = 10
    else:
        x = torch.randn(batch, spec["dim"], generator=g)
        k = 4
    labels = torch.randint(0, k, (batch,), generator=g)
    labels[batch // 2:] = -1
    return x.to(device), labels.to(device)


def train_step(model, opt, params, x, labels, set_to_none: bool = True,
               in_backward: StepInBackward | None = None) -> torch.Tensor:
    """One training step: forward, prior NLL, backward, clip, Adam; with ``in_backward`` (the ``fused`` policy) Adam
    steps each parameter inside the backward pass, as the Trainer's ``step_in_backward=True`` does (no clipping)."""
    opt.zero_grad(set_to_none=set_to_none or in_backward is not None)
    loss = model(x, labels).nll.mean()
    if in_backward is not None:
        with in_backward:
            loss.backward()
        return loss.detach()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 100.0)
    opt.step()
    return loss.detach()


def _setup(spec: dict, mode: str, device: torch.device, kept_grads: bool):
    model = build(spec).to(device).train()
    model.flow.invertible_backprop = mode == "invertible"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p in params:  # Adam's state allocated before the measured step: zero gradients, an update of exactly 0
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=not kept_grads)
    return model, opt, params


def _warm_up(model, params, spec: dict, device: torch.device, set_to_none: bool, batch: int = 2) -> None:
    """Forward and backward at a small batch: one-time set-up (kernels, thread pools) outside the measurement; no
    optimizer step, so both modes measure from the same weights."""
    x, labels = data(spec, batch, device, seed=7)
    model(x, labels).nll.mean().backward()
    for p in params:
        if set_to_none:
            p.grad = None
        else:
            p.grad.zero_()


# ------------------------------------------------------------------------------------------------- memory (CPU)
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident size to the current one
        f.write("5")


WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def memory_worker(job: dict) -> dict:
    """In a fresh process: one training step's peak memory above the memory before it (module docstring)."""
    device = torch.device(job["device"])
    torch.set_num_threads(job["threads"])
    model, opt, params = _setup(job["spec"], job["mode"], device, job["grads"] == "kept")
    _warm_up(model, params, job["spec"], device, job["grads"] != "kept")
    x, labels = data(job["spec"], job["batch"], device)
    param_mb = sum(p.numel() * p.element_size() for p in params) / 2**20
    in_backward = StepInBackward(opt) if job["grads"] == "fused" else None
    torch.manual_seed(2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        loss = train_step(model, opt, params, x, labels, job["grads"] != "kept", in_backward)
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        how = "torch.cuda.max_memory_allocated above memory_allocated before the step"
    else:
        _release_free_memory()
        base_kb = _status_kb("VmRSS")
        _reset_peak_rss()
        t0 = time.perf_counter()
        loss = train_step(model, opt, params, x, labels, job["grads"] != "kept", in_backward)
        wall = time.perf_counter() - t0
        peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
        how = "peak RSS (VmHWM after clear_refs) above RSS before the step"
    return {"peak_mb": peak_mb, "param_mb": param_mb, "loss": float(loss), "step_s": wall, "how": how}


def budget_worker(job: dict) -> dict:
    """In a fresh process under an address-space limit: two training steps; whether they fit (module docstring)."""
    device = torch.device("cpu")
    torch.set_num_threads(job["threads"])
    model, opt, params = _setup(job["spec"], job["mode"], device, False)
    _warm_up(model, params, job["spec"], device, True)  # thread pools and kernels set up before the limit
    x, labels = data(job["spec"], job["batch"], device)
    _release_free_memory()
    limit = _status_kb("VmSize") * 1024 + int(job["budget_mb"] * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _reset_peak_rss()
    base_kb = _status_kb("VmRSS")
    out = {"budget_mb": job["budget_mb"], "batch": job["batch"]}
    try:
        losses = [float(train_step(model, opt, params, x, labels)) for _ in range(2)]
        out.update(fits=True, losses=losses)
    except (RuntimeError, MemoryError) as exc:
        out.update(fits=False, error=common.error_text(exc))
    out["peak_rss_mb"] = (_status_kb("VmHWM") - base_kb) / 1024
    return out


def _in_fresh_process(kind: str, job: dict, timeout_s: float) -> dict:
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": str(common.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.bench_invertible", "--worker", kind, json.dumps(job)]
    try:
        r = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout_s:.0f} s"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": f"worker exited with {r.returncode}: {r.stderr.strip()[-300:]}"}
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------------------- timing
def _interleaved(step, names: tuple[str, str], pairs: int, seed: int) -> tuple[dict, list[float]]:
    """``pairs`` rounds of ``step(name)`` (the seconds of one step) for both names, the order shuffled per round;
    returns the times per name and the per-pair ratios t[names[1]] / t[names[0]]."""
    rng = random.Random(seed)
    times: dict = {n: [] for n in names}
    ratios = []
    for _ in range(pairs):
        order = list(names)
        rng.shuffle(order)
        t = {n: step(n) for n in order}
        for n in names:
            times[n].append(t[n])
        ratios.append(t[names[1]] / t[names[0]])
    return times, ratios


def time_pairs(spec: dict, batch: int, device: torch.device, pairs: int, seed: int = 0,
               warmup_batch: int | None = None) -> dict:
    """Median of per-pair ratios t_invertible / t_standard, steps interleaved (order shuffled per pair); one untimed
    step of each first (at ``warmup_batch``, default ``batch``)."""
    runners = {}
    for mode in MODES:
        model, opt, params = _setup(spec, mode, device, False)
        runners[mode] = (model, opt, params)
    if warmup_batch is not None:
        for model, opt, params in runners.values():
            _warm_up(model, params, spec, device, True, warmup_batch)
    x, labels = data(spec, batch, device)

    def step(mode):
        model, opt, params = runners[mode]
        common.sync(device)
        t0 = time.perf_counter()
        train_step(model, opt, params, x, labels)
        common.sync(device)
        return time.perf_counter() - t0

    if warmup_batch is None:
        for mode in MODES:  # warm-up: kernels, thread pools, allocator
            step(mode)
    times, ratios = _interleaved(step, MODES, pairs, seed)
    return {"pairs": pairs, "ratios": ratios, "median_ratio": statistics.median(ratios),
            "standard_s": times["standard"], "invertible_s": times["invertible"],
            "median_standard_s": statistics.median(times["standard"]),
            "median_invertible_s": statistics.median(times["invertible"])}


def time_fused_pairs(spec: dict, batch: int, device: torch.device, pairs: int, mode: str = "invertible",
                     seed: int = 0) -> dict:
    """The fused gradient policy's cost: steps of two identically initialised models in ``mode``, one with the
    Trainer's default step (backward, clip, Adam) and one with Adam stepped per parameter inside the backward pass
    (``fused``), interleaved (order shuffled per pair) after one untimed step of each; median of t_fused / t_none."""
    runners = {}
    for grads in ("none", "fused"):
        model, opt, params = _setup(spec, mode, device, False)
        runners[grads] = (model, opt, params, StepInBackward(opt) if grads == "fused" else None)
    x, labels = data(spec, batch, device)

    def step(grads):
        model, opt, params, in_backward = runners[grads]
        common.sync(device)
        t0 = time.perf_counter()
        train_step(model, opt, params, x, labels, True, in_backward)
        common.sync(device)
        return time.perf_counter() - t0

    for grads in runners:
        step(grads)
    times, ratios = _interleaved(step, ("none", "fused"), pairs, seed)
    return {"mode": mode, "pairs": pairs, "ratios": ratios, "median_ratio": statistics.median(ratios),
            "none_s": times["none"], "fused_s": times["fused"], "median_none_s": statistics.median(times["none"]),
            "median_fused_s": statistics.median(times["fused"])}


# -------------------------------------------------------------------------------------------------------- drift
def _grads(model, x, labels, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(x, labels).nll.mean().backward()
    return torch.cat([p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None])


def drift(spec: dict, batch: int, device: torch.device, train_steps: int = 0) -> dict:
    """Float32 gradient error (relative, in norm) against float64 standard autograd, for standard and invertible
    mode, and the largest relative error of a rebuilt input."""
    model = build(spec).to(device).train()
    x, labels = data(spec, batch, device)
    if train_steps:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-3)
        for i in range(train_steps):
            xi, li = data(spec, batch, device, seed=100 + i)
            train_step(model, opt, params, xi, li)
    ref = _grads(copy.deepcopy(model).double(), x.double(), labels)
    out = {"train_steps": train_steps}

    def rel(g):
        return ((g - ref).norm() / ref.norm()).item()

    out["grad_rel_standard"] = rel(_grads(model, x, labels))
    for every in (None, 4):
        model.flow.invertible_backprop, model.flow.checkpoint_every = True, every
        with DriftProbe() as probe:
            g = _grads(model, x, labels)
        errors = probe.errors()
        key = "none" if every is None else f"every{every}"
        out[f"grad_rel_invertible_{key}"] = rel(g)
        out[f"rebuilt_rel_max_{key}"] = max((e["rel"] for e in errors), default=0.0)
    model.flow.invertible_backprop, model.flow.checkpoint_every = False, None
    return out


# --------------------------------------------------------------------------------------------------------- suites
MNIST = {"kind": "image", "shape": [1, 28, 28], "mid": 64, "blocks": 8, "scales": 2}
MNIST_SMALL = {**MNIST, "mid": 32, "blocks": 2}  # bench_train_step's mnist-cpu scale, for more timing pairs


def tabular(couplings: int) -> dict:
    return {"kind": "tabular", "dim": 64, "couplings": couplings, "hidden": 256}


SUITES = {
    # (name, spec, axis, sizes, gradient policies) / (name, spec, batch, pairs, warm-up batch) /
    # (name, spec, batch, trained steps) / (name, spec, batch, budget MB)
    "cpu": {
        "memory": [("mnist", MNIST, "batch", [16], ("kept",)), ("mnist", MNIST, "batch", [64], ("kept", "none"))]
                  + [("tabular", tabular(n), "couplings", [5000], GRAD_POLICIES) for n in (4, 8, 16, 32)],
        "time": [("tabular", tabular(n), 5000, 5, None) for n in (4, 32)]
                + [("mnist-small", MNIST_SMALL, 32, 8, None), ("mnist", MNIST, 64, 3, 2)],
        "drift": [("tabular", tabular(n), 1000, steps) for n in (4, 8, 16, 32, 64) for steps in (0, 100)]
                 + [("mnist", MNIST, 8, 0)],
        "budget": [("tabular", tabular(32), 5000, 200), ("mnist", MNIST, 64, 1024)],
        "time-fused": [("tabular", tabular(32), 5000, 5)],
    },
    # the three targets only, for a loaded shared 2-core machine (the whole "cpu" suite takes ~2 h there):
    # the MNIST model's activation memory ("kept") and a paired step time at batch 64, the tabular depth sweep, the
    # untrained tabular drift per depth, and the tabular memory budget
    "cpu-targets": {
        "memory": [("mnist", MNIST, "batch", [64], ("kept",))]
                  + [("tabular", tabular(n), "couplings", [5000], GRAD_POLICIES if n in (4, 32) else ("kept",))
                     for n in (4, 8, 16, 32)],
        "time": [("tabular", tabular(32), 5000, 3, None), ("mnist", MNIST, 64, 1, 2)],
        "drift": [("tabular", tabular(n), 1000, 0) for n in (4, 8, 16, 32, 64)],
        "budget": [("tabular", tabular(32), 5000, 200)],
    },
    # the tabular depth sweep under the "fused" gradient policy only (the Trainer's step_in_backward=True)
    "cpu-fused": {"memory": [("tabular", tabular(n), "couplings", [5000], ("fused",)) for n in (4, 8, 16, 32)],
                  "time": [], "drift": [], "budget": [], "time-fused": [("tabular", tabular(32), 5000, 5)]},
    "smoke": {
        "memory": [("mnist", {**MNIST, "mid": 4, "blocks": 1, "shape": [1, 8, 8]}, "batch", [4], ("kept",))]
                  + [("tabular", {**tabular(n), "dim": 6, "hidden": 8}, "couplings", [16], ("none", "fused"))
                     for n in (2, 4)],
        "time": [("tabular", {**tabular(2), "dim": 6, "hidden": 8}, 16, 2, None)],
        "drift": [("tabular", {**tabular(n), "dim": 6, "hidden": 8}, 16, s) for n in (2, 4) for s in (0, 2)],
        "budget": [("tabular", {**tabular(4), "dim": 6, "hidden": 8}, 16, 512)],
        "time-fused": [("tabular", {**tabular(2), "dim": 6, "hidden": 8}, 16, 2)],
    },
}


def run(suite: dict, parts: list[str], device: torch.device, log=print, save=None) -> list[dict]:
    """Run the parts of a suite; ``save(records)`` is called after each part (partial results survive a crash)."""
    records = []
    save = save or (lambda recs: None)
    if "memory" in parts:
        for name, spec, axis, sizes, policies in suite["memory"]:
            for size in sizes:
                for grads in policies:
                    for mode in MODES:
                        job = {"spec": spec, "mode": mode, "batch": size, "grads": grads, "device": str(device),
                               "threads": torch.get_num_threads()}
                        rec = {"part": "memory", "config": name, "spec": spec, "axis": axis, "mode": mode,
                               "grads": grads, "batch": size,
                               "depth": spec.get("couplings", 10 if spec["kind"] == "image" else None),
                               **_in_fresh_process("memory", job, timeout_s=1800)}
                        records.append(rec)
                        log(f"memory {name} {axis}={rec['depth'] if axis == 'couplings' else size} grads={grads} "
                            f"{mode}: {rec.get('peak_mb', float('nan')):.1f} MB, loss {rec.get('loss')} "
                            f"{rec.get('error', '')}")
        save(records)
    if "time" in parts:
        for name, spec, batch, pairs, warmup_batch in suite["time"]:
            rec = {"part": "time", "config": name, "spec": spec, "batch": batch, "depth": spec.get("couplings", 10),
                   "warmup_batch": warmup_batch or batch, **time_pairs(spec, batch, device, pairs,
                                                                      warmup_batch=warmup_batch)}
            records.append(rec)
            save(records)
            log(f"time {name} depth={rec['depth']} batch={batch}: median paired ratio {rec['median_ratio']:.3f} "
                f"(standard {rec['median_standard_s']:.2f} s, invertible {rec['median_invertible_s']:.2f} s)")
    if "time-fused" in parts:
        for name, spec, batch, pairs in suite.get("time-fused", []):
            rec = {"part": "time-fused", "config": name, "spec": spec, "batch": batch,
                   "depth": spec.get("couplings", 10), **time_fused_pairs(spec, batch, device, pairs)}
            records.append(rec)
            save(records)
            log(f"time-fused {name} depth={rec['depth']} batch={batch} {rec['mode']}: median paired ratio fused/none "
                f"{rec['median_ratio']:.3f} (none {rec['median_none_s']:.2f} s, fused {rec['median_fused_s']:.2f} s)")
    if "drift" in parts:
        for name, spec, batch, steps in suite["drift"]:
            rec = {"part": "drift", "config": name, "spec": spec, "batch": batch,
                   "depth": spec.get("couplings", 10), **drift(spec, batch, device, steps)}
            records.append(rec)
            log(f"drift {name} depth={rec['depth']} trained={steps}: grad rel std {rec['grad_rel_standard']:.2e} "
                f"inv {rec['grad_rel_invertible_none']:.2e} (every4 {rec['grad_rel_invertible_every4']:.2e}); "
                f"rebuilt {rec['rebuilt_rel_max_none']:.2e} (every4 {rec['rebuilt_rel_max_every4']:.2e})")
        save(records)
    if "budget" in parts and device.type == "cpu":
        for name, spec, batch, budget in suite["budget"]:
            for mode in MODES:
                job = {"spec": spec, "mode": mode, "batch": batch, "budget_mb": budget,
                       "threads": torch.get_num_threads()}
                rec = {"part": "budget", "config": name, "spec": spec, "mode": mode,
                       "depth": spec.get("couplings", 10), **_in_fresh_process("budget", job, timeout_s=1800)}
                records.append(rec)
                log(f"budget {name} batch={batch} {budget} MB {mode}: fits={rec.get('fits')} "
                    f"peak {rec.get('peak_rss_mb', float('nan')):.0f} MB {rec.get('error', '')[:120]}")
                save(records)
    return records


# ----------------------------------------------------------------------------------------------- summary, plot
def _mem(records, config, mode, grads):
    return {(r["depth"] if r["axis"] == "couplings" else r["batch"]): r["peak_mb"] for r in records
            if r["part"] == "memory" and r["config"] == config and r["mode"] == mode and r["grads"] == grads
            and "peak_mb" in r}


def summary(records: list[dict]) -> str:
    """Markdown tables of a run's records."""
    out = []
    mem = [r for r in records if r["part"] == "memory" and "peak_mb" in r]
    if mem:
        cases: dict = {}
        for r in mem:
            key = (r["config"], r["axis"], r["depth"] if r["axis"] == "couplings" else r["batch"])
            cases.setdefault(key, {"param": r["param_mb"]})[(r["grads"], r["mode"])] = r["peak_mb"]
        rows = []
        for (config, axis, size), v in cases.items():
            row = [config, f"{'couplings' if axis == 'couplings' else 'batch'} {size}", f"{v['param']:.1f}"]
            for grads in GRAD_POLICIES:
                std, inv = v.get((grads, "standard")), v.get((grads, "invertible"))
                row += [f"{std:.0f}" if std is not None else "-", f"{inv:.0f}" if inv is not None else "-",
                        f"{std / inv:.1f}x" if std and inv else "-"]
            rows.append(row)
        out.append("Peak training-step memory above the memory before the step (MB); gradients `kept`: buffers "
                   "allocated before the step (activations and workspace only), `none`: allocated in the step (the "
                   "Trainer's zero_grad(set_to_none=True)), `fused`: each stepped and freed inside the backward pass "
                   "(the Trainer's step_in_backward=True; no clipping); params MB = the size of the gradients:\n\n"
                   + _md_table(["config", "size", "params MB"] + [f"{g}: {c}" for g in GRAD_POLICIES
                                                                  for c in (*MODES, "ratio")], rows))
        growth = []
        for config in dict.fromkeys(r["config"] for r in mem if r["axis"] == "couplings"):
            for grads in GRAD_POLICIES:
                for mode in MODES:
                    m = _mem(records, config, mode, grads)
                    if len(m) >= 2:
                        lo, hi = min(m), max(m)
                        growth.append(f"- {config}, gradients {grads}, {mode}: {lo} -> {hi} couplings: "
                                      f"{m[lo]:.0f} -> {m[hi]:.0f} MB ({100 * (m[hi] / m[lo] - 1):+.0f}%)")
        out += ["\n".join(growth)] if growth else []
    tables = [
        ("time", "Step time, standard and invertible steps interleaved in one process; median of the per-pair ratios "
                 "t_invertible / t_standard:",
         ["config", "depth", "batch", "pairs", "standard s", "invertible s", "ratio (median)", "ratios"],
         lambda r: [r["config"], r["depth"], r["batch"], r["pairs"], f"{r['median_standard_s']:.2f}",
                    f"{r['median_invertible_s']:.2f}", f"{r['median_ratio']:.3f}",
                    ", ".join(f"{x:.2f}" for x in r["ratios"])]),
        ("time-fused", "Step time of the fused gradient policy (Adam stepped per parameter inside the backward pass) "
                       "against the Trainer's default step (backward, clip, Adam), interleaved in one process; median "
                       "of the per-pair ratios t_fused / t_none:",
         ["config", "depth", "batch", "mode", "pairs", "none s", "fused s", "ratio (median)", "ratios"],
         lambda r: [r["config"], r["depth"], r["batch"], r["mode"], r["pairs"], f"{r['median_none_s']:.2f}",
                    f"{r['median_fused_s']:.2f}", f"{r['median_ratio']:.3f}",
                    ", ".join(f"{x:.2f}" for x in r["ratios"])]),
        ("drift", "Float32 drift: gradient error in norm against float64 standard autograd (||g - g64|| / ||g64||), "
                  "and the largest relative error of a rebuilt input:",
         ["config", "depth", "trained steps", "grad: standard", "grad: invertible",
          "grad: invertible, checkpoint every 4", "rebuilt input", "rebuilt, every 4"],
         lambda r: [r["config"], r["depth"], r["train_steps"]] + [f"{r[k]:.1e}" for k in (
             "grad_rel_standard", "grad_rel_invertible_none", "grad_rel_invertible_every4", "rebuilt_rel_max_none",
             "rebuilt_rel_max_every4")]),
        ("budget", "Fixed memory budget (address-space limit above the process after setup), two training steps:",
         ["config", "batch", "budget MB", "mode", "fits", "peak RSS MB", "error"],
         lambda r: [f"{r['config']} (depth {r['depth']})", r.get("batch", "-"), r.get("budget_mb", "-"), r["mode"],
                    r.get("fits", "-"), f"{r.get('peak_rss_mb', float('nan')):.0f}", r.get("error", "")[:80]]),
    ]
    for part, title, header, row in tables:
        recs = [r for r in records if r["part"] == part]
        if recs:
            out.append(title + "\n\n" + _md_table(header, [row(r) for r in recs]))
    return "\n\n".join(out) + "\n"


def plot(records: list[dict], meta: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"standard": ("tab:red", "o"), "invertible": ("tab:blue", "s")}
    for config, axis_name, ax in (("tabular", "couplings", axes[0]), ("mnist", "batch", axes[1])):
        for mode in MODES:
            for grads, ls in (("kept", "-"), ("none", ":"), ("fused", "--")):
                m = _mem(records, config, mode, grads)
                if m:
                    color, marker = styles[mode]
                    ax.plot(list(m), list(m.values()), ls, color=color, marker=marker,
                            label=f"{mode}, grads {grads}")
        ax.set_xlabel(axis_name)
        ax.set_ylabel("peak step memory above baseline (MB)")
        ax.set_title(f"{config}: memory vs {axis_name}", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax = axes[2]
    for config, color in (("tabular", "tab:green"), ("mnist", "tab:purple")):
        for trained, ls in ((0, "-"), (100, "--")):
            rs = sorted((r for r in records if r["part"] == "drift" and r["config"] == config
                         and r["train_steps"] == trained), key=lambda r: r["depth"])
            if not rs:
                continue
            d = [r["depth"] for r in rs]
            ax.plot(d, [r["grad_rel_invertible_none"] for r in rs], ls, color=color, marker="s",
                    label=f"{config} grad, invertible, trained {trained}")
            ax.plot(d, [r["grad_rel_standard"] for r in rs], ls, color="gray", marker="o", alpha=0.6,
                    label=f"{config} grad, standard fp32, trained {trained}")
            ax.plot(d, [r["rebuilt_rel_max_none"] for r in rs], ls, color=color, marker="^", alpha=0.6,
                    label=f"{config} rebuilt input, trained {trained}")
    ax.set_yscale("log")
    ax.set_xlabel("couplings")
    ax.set_title("float32 error vs float64 (gradients: in norm)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    ratios = [f"{r['config']} d{r['depth']} b{r['batch']}: {r['median_ratio']:.2f}x" for r in records
              if r["part"] == "time"]
    fig.suptitle(f"backprop by inversion | {meta['device']} | torch {meta['torch']} | commit "
                 f"{str(meta['git_commit'])[:8]} | step time ratios: {'; '.join(ratios) or '-'}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


README_START, README_END = "<!-- invertible:start -->", "<!-- invertible:end -->"


def targets(records: list[dict]) -> list[list]:
    """The issue's three targets as rows [target, measured, met ("yes"/"no"/"not measured")], from the records."""
    rows = []
    std, inv = _mem(records, "mnist", "standard", "kept").get(64), _mem(records, "mnist", "invertible", "kept").get(64)
    t = next((r for r in records if r["part"] == "time" and r["config"] == "mnist" and r["batch"] == 64), None)
    name = "MNIST RealNVP (2 scales, mid 64, 8 blocks), batch 64: activation memory >= 4x lower"
    rows.append([name, f"{std / inv:.1f}x ({std:.0f} -> {inv:.0f} MB)", "yes" if std / inv >= 4 else "no"]
                if std and inv else [name, "-", "not measured"])
    name = "... and step time <= 1.4x standard"
    rows.append([name, f"{t['median_ratio']:.2f}x ({t['pairs']} pair{'s' * (t['pairs'] != 1)})",
                 "yes" if t["median_ratio"] <= 1.4 else "no"] if t else [name, "-", "not measured"])
    for grads in GRAD_POLICIES:
        m_std, m_inv = (_mem(records, "tabular", mode, grads) for mode in MODES)
        name = (f"RealNVPTabular 4 -> 32 couplings (gradients {grads}{POLICY_NOTES.get(grads, '')}): invertible grows "
                f"< 15%, standard grows")
        if all(k in m for m in (m_std, m_inv) for k in (4, 32)):
            g_inv, g_std = (100 * (m[32] / m[4] - 1) for m in (m_inv, m_std))
            rows.append([name, f"invertible {m_inv[4]:.0f} -> {m_inv[32]:.0f} MB ({g_inv:+.0f}%), standard "
                               f"{m_std[4]:.0f} -> {m_std[32]:.0f} MB ({g_std:+.0f}%)",
                         "yes" if g_inv < 15 and g_std > g_inv + 15 else "no"])
        else:
            rows.append([name, "-", "not measured"])
    budget: dict = {}
    for r in records:
        if r["part"] == "budget" and "fits" in r:
            budget.setdefault((r["config"], r["depth"], r["batch"], r["budget_mb"]), {})[r["mode"]] = r["fits"]
    name = "a batch over a fixed memory budget in standard mode trains in invertible mode"
    shown = [k for k, v in budget.items() if v.get("standard") is False and v.get("invertible") is True]
    if shown:
        config, depth, batch, mb = shown[0]
        rows.append([name, f"{config} (depth {depth}), batch {batch}, {mb} MB above the set-up process: standard "
                           f"fails, invertible trains 2 steps", "yes"])
    else:
        rows.append([name, "; ".join(f"{k[0]} batch {k[2]}, {k[3]} MB: standard fits={v.get('standard')}, "
                                     f"invertible fits={v.get('invertible')}" for k, v in budget.items()) or "-",
                     "no" if budget else "not measured"])
    return rows


def _unit(record: dict) -> str:
    """What a later results file replaces: a whole part ("time", "drift", "budget"), or for memory one config under
    one gradient policy ("memory tabular/fused"), so a file that adds a policy keeps the earlier policies."""
    if record["part"] == "memory":
        return f"memory {record['config']}/{record['grads']}"
    return record["part"]


def merge_results(datas: list[dict]) -> tuple[list[dict], list[set[str]]]:
    """The records of several results files, and the parts each file still contributes: a part ("time", "drift",
    "budget"; for memory, one config under one gradient policy, :func:`_unit`) measured in a later file replaces that
    part of the earlier files (a re-measured part on a quieter machine supersedes the old one)."""
    records: list[dict] = []
    used: list[set[str]] = []
    for data in datas:
        parts = {_unit(r) for r in data["records"]}
        records = [r for r in records if _unit(r) not in parts] + list(data["records"])
        used = [u - parts for u in used] + [parts]
    return records, used


def _source(meta: dict) -> str:
    return f"{meta['device']}, torch {meta['torch']}, commit `{str(meta['git_commit'])[:8]}`, {meta['date_utc']}"


def readme_block(records: list[dict], meta: dict, results: Path, png: Path | None, root: Path,
                 sources: list[tuple[Path, dict, set[str]]] | None = None) -> str:
    """The README's block between README_START and README_END: the targets and the figures, from one results file
    (``results``, ``meta``) or, with ``sources`` (path, metadata, parts used) per file, from several merged by
    :func:`merge_results` (``results`` / ``meta``: the last one)."""
    def rel(p):
        try:
            return Path(p).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return Path(p).as_posix()

    paths = [p for p, _, _ in sources] if sources else [results]
    if not sources:
        origin = f"from that results file ({_source(meta)})"
    else:
        origin = ("from those results files, a part measured in a later file replacing the earlier one's ("
                  + "; ".join(f"`{Path(p).name}`: {', '.join(sorted(parts))}, {_source(m)}" for p, m, parts in sources)
                  + ")")
    lines = [README_START, "",
             f"Generated by `python -m benchmarks.bench_invertible --render {' '.join(rel(p) for p in paths)}` "
             f"{origin}. "
             "CPU memory: peak resident size of one training step above the size before it, in a fresh process per "
             f"case ({POLICY_TEXT}); step times: standard and invertible steps interleaved in one process, median of "
             "the per-pair ratios.", "",
             _md_table(["target", "measured", "met"], targets(records)), ""]
    fused_times = [r for r in records if r["part"] == "time-fused"]
    if fused_times:
        lines += ["Step time of the `fused` policy against the Trainer's default step (backward, clip, Adam), "
                  "interleaved pairs, median of t_fused / t_none: " + "; ".join(
                      f"{r['config']} {r['depth']} couplings, batch {r['batch']}, {r['mode']}: "
                      f"{r['median_ratio']:.2f}x ({r['pairs']} pairs: {', '.join(f'{x:.2f}' for x in r['ratios'])}; "
                      f"{r['median_none_s']:.2f} s vs {r['median_fused_s']:.2f} s)" for r in fused_times) + ".", ""]
    drift = sorted((r for r in records if r["part"] == "drift"), key=lambda r: (r["config"], r["train_steps"],
                                                                               r["depth"]))
    def drift_text(r):
        trained = f", trained {r['train_steps']} steps" if r["train_steps"] else ""
        return (f"{r['config']} {r['depth']} couplings{trained}: {r['grad_rel_standard']:.1e} / "
                f"{r['grad_rel_invertible_none']:.1e} / {r['grad_rel_invertible_every4']:.1e}, rebuilt "
                f"{r['rebuilt_rel_max_none']:.1e}")

    if drift:
        lines += ["Float32 drift: gradient error against float64 in norm, standard autograd / invertible / invertible "
                  "with `checkpoint_every=4`, and the largest relative error of a rebuilt input: "
                  + "; ".join(drift_text(r) for r in drift) + ".", ""]
    if png is not None:
        lines += [f"![backprop by inversion: memory and drift]({rel(png)})", ""]
    lines += [f"All tables: `{rel(Path(results).parent / ('invertible_' + meta['device_tag'] + '.md'))}`.", "",
              README_END]
    return "\n".join(lines)


def write_outputs(records: list[dict], meta: dict, path: Path, readme: Path | None,
                  sources: list[tuple[Path, dict, set[str]]] | None = None) -> dict:
    """Tables (.md), plot (.png) and, when ``readme`` has the markers, the README block, for the results file at
    ``path`` (``meta``: its metadata), or for several merged files (``sources`` as in :func:`readme_block`; ``path``
    and ``meta`` the last one)."""
    path = Path(path)
    stem = path.parent / f"invertible_{meta['device_tag']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = summary(records)
    files = (", ".join(f"`{Path(p).name}`" for p, _, _ in sources)
             + " (a part measured in a later file replaces the earlier one's)") if sources else f"`{path.name}`"
    stem.with_suffix(".md").write_text(f"# Backprop by inversion: {meta['device']}, commit "
                                       f"{str(meta['git_commit'])[:8]}, {meta['date_utc']}\n\n"
                                       f"Results file{'s' * bool(sources)}: {files}\n\n" + text)
    png = plot(records, meta, stem.with_suffix(".png"))
    out = {"path": str(path), "md": str(stem.with_suffix(".md")), "png": str(png) if png else None,
           "summary": text, "readme_updated": False}
    if readme is not None:
        root = readme.parent
        block = readme_block(records, meta, path, png, root, sources)
        body = readme.read_text() if readme.exists() else ""
        if README_START in body and README_END in body and body.index(README_START) < body.index(README_END):
            readme.write_text(body[:body.index(README_START)] + block + body[body.index(README_END) + len(README_END):])
            out["readme_updated"] = True
        out["readme_block"] = block
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        job = json.loads(argv[2])
        result = {"memory": memory_worker, "budget": budget_worker}[argv[1]](job)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="cpu", choices=tuple(SUITES))
    p.add_argument("--parts", default="memory,time,drift,budget,time-fused")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads (default 1: on a shared machine, multithreaded timings are dominated by "
                        "preemption at OpenMP barriers -- measured here: one mnist-small step 85 s with 2 threads, "
                        "13 s with 1); recorded in the file's device tag")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--render", metavar="RESULTS_JSON", nargs="+",
                   help="measure nothing: write the tables, the plot and the README block of existing results files "
                        "(several: a part measured in a later file replaces that part of the earlier ones)")
    p.add_argument("--readme", default=str(common.ROOT / "README.md"),
                   help=f"README whose {README_START} ... {README_END} block is rewritten ('' for none)")
    args = p.parse_args(argv)
    readme = Path(args.readme) if args.readme else None
    if args.render:
        datas = [common.load_results(f) for f in args.render]
        records, used = merge_results(datas)
        sources = [(Path(f), d["meta"], u) for f, d, u in zip(args.render, datas, used)] if len(datas) > 1 else None
        result = write_outputs(records, datas[-1]["meta"], Path(args.render[-1]), readme, sources)
        print("\n".join(" | ".join(map(str, row)) for row in targets(records)))
        print(f"# wrote {result['md']}" + (f", {result['png']}" if result["png"] else "")
              + (f"; {readme} block updated" if result["readme_updated"] else ""))
        return result
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in ("memory", "time", "drift", "budget", "time-fused")]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    meta = common.run_metadata(device, [sys.argv[0], *argv])
    print(f"# {meta['device']} | torch {meta['torch']} | commit {str(meta['git_commit'])[:8]} | backend "
          f"{flowgmm_fast.get_backend()}", flush=True)
    started = time.monotonic()

    def save(recs):
        if not args.no_write:
            extra = {"suite": args.suite, "parts": parts, "wall_s": time.monotonic() - started}
            return common.write_results("invertible", meta, recs, args.out_dir, extra=extra)

    records = run(SUITES[args.suite], parts, device, log=lambda s: print(s, flush=True), save=save)
    result = {"records": records, "summary": summary(records)}
    print(result["summary"])
    if not args.no_write:
        path = save(records)
        out = write_outputs(records, meta, path, readme)
        print("\n".join(" | ".join(map(str, row)) for row in targets(records)))
        print(f"# wrote {path}, {out['md']}" + (f", {out['png']}" if out["png"] else "")
              + (f"; {readme} block updated" if out["readme_updated"] else ""))
        result.update(path=str(path), png=out["png"])
    return result


if __name__ == "__main__":
    main()
