"""Shared benchmark machinery: timers, the copy-bandwidth ceiling, peak memory, run metadata and results files.

Timing
------
GPU: :func:`time_cuda_interleaved`: :func:`triton.testing.do_bench` (CUDA events, L2 flushed before each run) in
rounds, each round running every candidate once in a freshly shuffled order for a share of the repetition time; the
median and the 20% / 80% quantiles are over all timed calls, a round's sample is the median of its calls.
CPU: :func:`time_interleaved`: the candidates of one benchmark case are timed *side by side* -- each round takes one
sample of every candidate in a freshly shuffled order, a sample being the mean of ``inner`` back-to-back calls (calibrated
so a sample lasts about ``sample_ms``) -- so load from other processes on a shared machine hits every candidate alike and
the ratios stay meaningful even when the absolute times drift. Garbage collection is off while timing.
Both keep each round's sample (``round_ms``, in round order) when asked, so that :func:`paired_ratio` can compare two
candidates round by round: the median over rounds of t_candidate / t_reference of the same round, which cancels the
drift the medians of the two separately still carry.

Results
-------
One JSON file per run in ``benchmarks/results/`` (see :func:`write_results`): ``{"kind", "meta", "records"}`` where
``meta`` (:func:`run_metadata`) names the device, torch / triton / CUDA versions, the native extension's build info, the
git commit (and whether the tree was dirty), the date and the command line.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
QUANTILES = (0.5, 0.2, 0.8)


# --------------------------------------------------------------------------------------------------- device / sync
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """Short file-name-safe tag of the device, e.g. ``cpu-2t`` (CPU with torch's thread count: runs with different
    thread counts are kept apart) or ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return f"cpu-{torch.get_num_threads()}t"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# ---------------------------------------------------------------------------------------------------------- timing
def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending list (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> dict:
    """``{"median_ms", "q20_ms", "q80_ms", "n"}`` of per-call times in milliseconds."""
    if not samples_ms:
        raise ValueError("summarize: samples_ms must hold at least one time")
    s = sorted(samples_ms)
    return {"median_ms": _quantile(s, 0.5), "q20_ms": _quantile(s, 0.2), "q80_ms": _quantile(s, 0.8), "n": len(s)}


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, rounds: int = 15,
                     sample_ms: float = 20.0, budget_s: float | None = None, seed: int = 0,
                     keep_rounds: bool = False) -> dict[str, dict]:
    """CPU timer: per-call time statistics of each zero-argument callable, sampled side by side (module docstring).

    ``warmup`` untimed calls each; then ``rounds`` rounds (fewer if the whole case would exceed ``budget_s``; at least 3).
    Returns ``{name: summarize(...)}`` in milliseconds per call, plus ``round_ms`` (the samples in round order) when
    ``keep_rounds``.
    """
    if not fns:
        return {}
    if rounds < 1 or warmup < 0 or sample_ms <= 0:
        raise ValueError(f"time_interleaved needs rounds >= 1, warmup >= 0, sample_ms > 0; got {rounds}, {warmup}, "
                         f"{sample_ms}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner: dict[str, int] = {}
    per_round_s = 0.0
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, int(sample_ms / 1e3 / once))
        per_round_s += inner[name] * once
    if budget_s is not None and per_round_s > 0:
        rounds = max(3, min(rounds, int(budget_s / per_round_s)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                fn, n = fns[name], inner[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1e3 / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: dict(summarize(v), round_ms=v) if keep_rounds else summarize(v) for name, v in samples.items()}


def paired_ratio(stats: dict, ref: dict) -> dict | None:
    """Median and 20% / 80% quantiles over rounds of ``stats``' sample / ``ref``'s sample of the same round (two
    entries of a :func:`time_interleaved` / :func:`time_cuda_interleaved` result with ``round_ms``); None without
    paired rounds."""
    a, b = stats.get("round_ms"), ref.get("round_ms")
    if not a or not b or len(a) != len(b):
        return None
    r = sorted(x / y for x, y in zip(a, b) if y > 0)
    if not r:
        return None
    return {"median": _quantile(r, 0.5), "q20": _quantile(r, 0.2), "q80": _quantile(r, 0.8), "n": len(r)}


def time_cuda_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 5, warmup_ms: int = 25,
                          rep_ms: int = 100, seed: int = 0, bench=None) -> dict[str, dict]:
    """GPU timer: ``rounds`` rounds of ``do_bench`` (``rep_ms / rounds`` of repetitions each) over every callable in a
    freshly shuffled order per round. Returns ``{name: summarize(all timed calls) + round_ms}`` (ms; a round's sample
    is the median of its calls). ``bench`` replaces ``triton.testing.do_bench`` (tests)."""
    if not fns:
        return {}
    if rounds < 1:
        raise ValueError(f"time_cuda_interleaved needs rounds >= 1, got {rounds}")
    if bench is None:
        from triton.testing import do_bench as bench
    times: dict[str, list[float]] = {name: [] for name in fns}
    round_ms: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for k in range(rounds):
        rng.shuffle(order)
        for name in order:
            # the first round warms up for warmup_ms; later rounds only enough to refill the caches
            got = [float(t) for t in bench(fns[name], warmup=warmup_ms if k == 0 else 1,
                                           rep=max(1, rep_ms // rounds), return_mode="all")]
            times[name] += got
            round_ms[name].append(_quantile(sorted(got), 0.5))
    return {name: dict(summarize(times[name]), n=None, round_ms=round_ms[name]) for name in fns}


def time_cuda(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 100) -> dict:
    """GPU timer: ``triton.testing.do_bench`` median and 20/80% quantiles (ms) of one call of ``fn``."""
    from triton.testing import do_bench

    med, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return {"median_ms": med, "q20_ms": q20, "q80_ms": q80, "n": None}


def time_fns(fns: dict[str, Callable[[], object]], device: torch.device, *, cpu_rounds: int = 15,
             cpu_budget_s: float | None = None, cpu_warmup: int = 2, cuda_rep_ms: int = 100,
             paired: bool = False, cuda_rounds: int = 5) -> dict[str, dict]:
    """Time each callable on ``device`` with the device's timer (do_bench on CUDA, side by side on the CPU).
    ``paired``: keep each round's sample (``round_ms``, for :func:`paired_ratio`); on CUDA the do_bench calls are then
    interleaved in ``cuda_rounds`` rounds (:func:`time_cuda_interleaved`) instead of one do_bench per callable."""
    if device.type == "cuda":
        if paired:
            return time_cuda_interleaved(fns, rounds=cuda_rounds, rep_ms=cuda_rep_ms)
        return {name: time_cuda(fn, rep_ms=cuda_rep_ms) for name, fn in fns.items()}
    return time_interleaved(fns, warmup=cpu_warmup, rounds=cpu_rounds, budget_s=cpu_budget_s, keep_rounds=paired)


# ------------------------------------------------------------------------------------------------- memory, bandwidth
def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Run ``fn`` once; return the peak CUDA memory allocated meanwhile above what was allocated before (MiB), or None
    on the CPU (not measured there)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> dict:
    """Measured device copy bandwidth: ``dst.copy_(src)`` of a buffer larger than the caches, counting bytes read plus
    bytes written (GB/s = 1e9 B/s). The ceiling the op benchmarks' GB/s figures are compared with."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 27
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    stats = time_fns({"copy": lambda: dst.copy_(src)}, device, cpu_rounds=15, cuda_rep_ms=200)["copy"]
    return {"bytes": 2 * n * 4, "gbps": 2 * n * 4 / (stats["median_ms"] * 1e-3) / 1e9, **stats}


# ------------------------------------------------------------------------------------------------------- metadata
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata(device: torch.device, argv: list[str] | None = None) -> dict:
    """Everything needed to read a results file later: device, versions, backends, commit, date, command."""
    import flowgmm_fast
    from flowgmm_fast import _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    native_build = None
    if _backend.unavailable_reason("native") is None:
        try:
            native_build = dict(importlib.import_module("flowgmm_fast._C").build_info())
        except Exception as exc:  # build_info is optional metadata; a failure is recorded, not fatal
            native_build = {"error": f"{type(exc).__name__}: {exc}"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device.type,
        "device": device_name(device),
        "device_tag": device_tag(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "flowgmm_fast": flowgmm_fast.__version__,
        "backends_available": flowgmm_fast.available_backends(),
        "backend_reasons": {b: _backend.unavailable_reason(b) for b in ("triton", "native")},
        "native_build": native_build,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        # a copy of the tree without .git (e.g. on a lent GPU machine) takes the commit from the environment
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("FLOWGMM_BENCH_COMMIT"),
        "git_dirty": bool(status) if status is not None else None,
        "command": " ".join(argv if argv is not None else sys.argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["sm_count"] = props.multi_processor_count
        meta["compute_capability"] = f"{props.major}.{props.minor}"
    return meta


def results_path(kind: str, meta: dict, out_dir: Path | str | None = None) -> Path:
    """``<out_dir>/<kind>_<device tag>_<UTC date-time>_<commit>.json``."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    stamp = meta["date_utc"].replace("-", "").replace(":", "")
    commit = (meta.get("git_commit") or "nocommit")[:8]
    return out_dir / f"{kind}_{meta['device_tag']}_{stamp}_{commit}.json"


def write_results(kind: str, meta: dict, records: list[dict], out_dir: Path | str | None = None,
                  extra: dict | None = None) -> Path:
    """Write one results file (see module docstring); returns its path."""
    path = results_path(kind, meta, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": kind, "meta": meta, **(extra or {}), "records": records}
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    return path


def finish_summary_run(kind: str, meta: dict, records: list[dict], summary: dict, out_dir, write: bool) -> dict:
    """The end of a benchmark that checks one target: ``{"records", **summary}`` and, when ``write``, the results
    file (``summary`` stored beside the records) and its path under "path" (printed)."""
    result = {"records": records, **summary}
    if write:
        path = write_results(kind, meta, records, out_dir, extra={"summary": summary})
        print(f"wrote {path}")
        result["path"] = path
    return result


def load_results(path: Path | str) -> dict:
    data = json.loads(Path(path).read_text())
    for key in ("kind", "meta", "records"):
        if key not in data:
            raise ValueError(f"{path}: not a benchmarks results file (missing {key!r})")
    return data


def error_text(exc: BaseException) -> str:
    """One line naming an exception, for a record whose candidate failed (kept, not raised: the run goes on)."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"
