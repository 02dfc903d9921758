"""Op micro-benchmarks: every op of flowgmm_fast x every available backend x the model's real shapes.

Ops (each called through the backends' normalised signatures, see :mod:`flowgmm_fast.ops.reference`):
  coupling_fwd     affine_coupling forward, no grad        coupling_inv   affine_coupling reverse, no grad
  coupling_fwdbwd  forward + backward (grads of x, s, t, scale through ``torch.autograd.grad``; no .grad accumulation)
  squeeze          squeeze2x2 forward                      logit          logit_transform forward with dequantisation noise
  gmm_fwdbwd       gmm_nll forward + backward (grads of z, means, log_std; half the batch labeled)
Candidates: ``torch-eager`` (the reference), ``torch-compile`` (``torch.compile`` of the reference, the honest
competitor), ``triton`` and ``native`` when available for the device (never the Triton CPU interpreter), and for the GMM
op ``original-fullcov``, the original code's full-covariance MultivariateNormal prior (:mod:`benchmarks.baseline_original`).

Figures per candidate: median and 20/80% quantiles of one call (ms), achieved GB/s over the op's minimal bytes (each
input read once, each output written once; see :func:`min_bytes`) and its share of the copy bandwidth measured in the
same run, the speed-up over torch-eager and over torch-compile (ratios of the medians), the paired time ratio against
torch-eager (``paired_vs_eager``: the median over rounds of t_candidate / t_eager of the same round, with its 20/80%
quantiles), the relative error against torch-eager on the same inputs, and peak extra memory (CUDA only).
Timing interleaves the candidates of a case (A B A B ..., order shuffled per round) on both devices:
``common.time_interleaved`` on the CPU, rounds of ``do_bench`` on CUDA (``--gpu-rounds``).

Usage (repository root): ``python -m benchmarks.bench_ops --suite cpu`` (or ``gpu`` / ``smoke``); writes
``benchmarks/results/ops_<device>_<date>_<commit>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import flowgmm_fast
from flowgmm_fast import _backend
from flowgmm_fast.ops import reference as R

from . import common
from .baseline_original import original_gmm_nll

OPS = ("coupling_fwd", "coupling_inv", "coupling_fwdbwd", "squeeze", "logit", "gmm_fwdbwd")
EAGER, COMPILE, ORIGINAL = "torch-eager", "torch-compile", "original-fullcov"
_BACKEND_OP = {"coupling_fwd": "affine_coupling", "coupling_inv": "affine_coupling",
               "coupling_fwdbwd": "affine_coupling", "squeeze": "squeeze2x2", "logit": "logit_transform",
               "gmm_fwdbwd": "gmm_nll"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One benchmark case. shape: x's shape ((B, C, H, W) or (B, D)), or (B, D, K) for the GMM op.
    mask: "checkerboard", "none" or "half" (a dense 0/1 tensor over the features) for the coupling ops."""

    op: str
    name: str
    shape: tuple[int, ...]
    mask: str = "none"
    dtype: str = "float32"
    tags: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"Case.op must be one of {OPS}, got {self.op!r}")
        if self.mask not in ("checkerboard", "none", "half"):
            raise ValueError(f"Case.mask must be 'checkerboard', 'none' or 'half', got {self.mask!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"Case.dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")


# --------------------------------------------------------------------------------------------------------- shapes
# The RealNVP layer shapes of FlowGMM (num_scales=2): checkerboard couplings on the scale's input, channel-wise
# couplings on the transformed half after the squeeze (2C channels at H/2 x W/2, no mask), 4 checkerboard couplings on
# the second scale's input (2C channels at H/2 x W/2).
def _image_coupling_shapes(batch: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        (f"mnist-s0-ckbd-b{batch}", (batch, 1, 28, 28), "checkerboard"),
        (f"mnist-s0-chan-b{batch}", (batch, 2, 14, 14), "none"),
        (f"mnist-s1-ckbd-b{batch}", (batch, 2, 14, 14), "checkerboard"),
        (f"cifar-s0-ckbd-b{batch}", (batch, 3, 32, 32), "checkerboard"),
        (f"cifar-s0-chan-b{batch}", (batch, 6, 16, 16), "none"),
        (f"cifar-s1-ckbd-b{batch}", (batch, 6, 16, 16), "checkerboard"),
    ]


_TARGET_C12 = ("target-c12-16x16-b64", (64, 12, 16, 16), "checkerboard")  # native/triton issues' layer-shape target
_TARGET_VEC = ("target-vec-b256-d768", (256, 768), "half")                 # native issue's vector target
_TABULAR = ("tabular-b5000-d768", (5000, 768), "half")                     # RealNVPTabular, text embeddings
_LARGE_C12 = ("large-c12-64x64-b256", (256, 12, 64, 64), "checkerboard")   # triton issue's bandwidth target
_LARGE_C48 = ("large-c48-64x64-b256", (256, 48, 64, 64), "checkerboard")


def _coupling_cases(entries, dtypes=("float32",), ops=("coupling_fwd", "coupling_inv", "coupling_fwdbwd")):
    return [Case(op, name, shape, mask, dt) for op in ops for (name, shape, mask) in entries for dt in dtypes]


def _targets_first(cases: list[Case]) -> list[Case]:
    """The issues' target cases first, so that a run cut short by its deadline still measures them."""
    return sorted(cases, key=lambda c: (not c.name.startswith(("target", "large")), c.op != "coupling_fwdbwd"))


def suite(name: str) -> list[Case]:
    """The cases of suite ``name``: "cpu" (fits the 10-minute CPU run), "gpu" (every shape, plus bandwidth shapes)
    or "smoke" (tiny shapes, seconds)."""
    if name == "smoke":
        cases = _coupling_cases([("tiny-ckbd", (2, 2, 4, 4), "checkerboard"), ("tiny-half", (3, 6), "half")])
        cases += [Case("squeeze", "tiny", (2, 2, 4, 4)), Case("logit", "tiny", (2, 2, 4, 4)),
                  Case("gmm_fwdbwd", "tiny", (4, 8, 3))]
        return cases
    if name == "cpu":
        entries = [_image_coupling_shapes(64)[0], _image_coupling_shapes(64)[3], _TARGET_C12, _TARGET_VEC, _TABULAR]
        cases = _coupling_cases(entries)
        for b in (64, 256):
            cases += [Case("squeeze", f"cifar-b{b}", (b, 3, 32, 32)), Case("logit", f"cifar-b{b}", (b, 3, 32, 32))]
        cases += [Case("gmm_fwdbwd", "mnist-b64", (64, 784, 10)), Case("gmm_fwdbwd", "target-b512-d784", (512, 784, 10)),
                  Case("gmm_fwdbwd", "cifar-b64", (64, 3072, 10)), Case("gmm_fwdbwd", "tabular-b5000", (5000, 768, 4))]
        return _targets_first(cases)
    if name == "gpu":
        entries = _image_coupling_shapes(64) + _image_coupling_shapes(256)[3:] + [_TARGET_C12, _TARGET_VEC, _TABULAR,
                                                                                  _LARGE_C12, _LARGE_C48]
        cases = _coupling_cases(entries)
        cases += _coupling_cases([_TARGET_C12, _LARGE_C12], dtypes=("bfloat16",), ops=("coupling_fwd",
                                                                                        "coupling_fwdbwd"))
        for b in (64, 256):
            cases += [Case("squeeze", f"mnist-b{b}", (b, 1, 28, 28)), Case("squeeze", f"cifar-b{b}", (b, 3, 32, 32)),
                      Case("logit", f"mnist-b{b}", (b, 1, 28, 28)), Case("logit", f"cifar-b{b}", (b, 3, 32, 32))]
        cases += [Case("squeeze", "large-b256-c12-128", (256, 12, 128, 128)),
                  Case("logit", "large-b256-c3-256", (256, 3, 256, 256))]
        cases += [Case("gmm_fwdbwd", "mnist-b64", (64, 784, 10)), Case("gmm_fwdbwd", "cifar-b64", (64, 3072, 10)),
                  Case("gmm_fwdbwd", "target-b512-d784", (512, 784, 10)),
                  Case("gmm_fwdbwd", "target-b4096-d3072", (4096, 3072, 10)),
                  Case("gmm_fwdbwd", "tabular-b5000", (5000, 768, 4)),
                  Case("gmm_fwdbwd", "large-b65536-d3072-k100", (65536, 3072, 100))]
        return _targets_first(cases)
    raise ValueError(f"suite must be 'cpu', 'gpu' or 'smoke', got {name!r}")


# ------------------------------------------------------------------------------------------------ inputs and calls
def min_bytes(case: Case) -> int:
    """Fewest bytes the op must move: each input read once, each output written once (a fused implementation).

    coupling fwd / inverse: read x, s, t, write y (4N) plus scale, mask, sldj; fwd+bwd: the forward (4N) plus a backward
    reading x, s, t, dy and writing dx, ds, dt (7N); squeeze: 2N; logit: read x and the noise, write y (3N);
    GMM fwd+bwd: forward reads z and means, backward reads them again and writes their grads (3 BD + 3 KD).
    """
    es = torch.empty((), dtype=_DTYPES[case.dtype]).element_size()
    if case.op == "gmm_fwdbwd":
        b, d, k = case.shape
        return 4 * (3 * b * d + 3 * k * d + 4 * b + 2 * k)
    b, n = case.shape[0], 1
    for s in case.shape:
        n *= s
    per_sample = n // max(b, 1)
    extra = 4 * (case.shape[1] + 2 * b) + (es * per_sample if case.mask == "half" else 0)
    if case.op in ("coupling_fwd", "coupling_inv"):
        return 4 * n * es + extra
    if case.op == "coupling_fwdbwd":
        return 11 * n * es + 2 * extra
    if case.op == "squeeze":
        return 2 * n * es
    return 3 * n * es + 4 * 2 * b


class Inputs:
    """Random inputs of one case (never zeros: they can hide wrong indexing and run faster than real data)."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        dt = _DTYPES[case.dtype]

        def rand(*shape, fn=torch.randn, scale=1.0, dtype=dt):
            return (fn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        self.case = case
        if case.op == "gmm_fwdbwd":
            b, d, k = case.shape
            self.z = rand(b, d, dtype=torch.float32)
            self.means = rand(k, d, dtype=torch.float32)
            self.log_std = rand(k, scale=0.1, dtype=torch.float32)
            labels = torch.randint(0, k, (b,), generator=g)
            labels[b // 2:] = -1
            self.labels = labels.to(device)
            self.grad = rand(b, dtype=torch.float32)
            return
        shape = case.shape
        b = shape[0]
        if case.op == "logit":
            self.x = rand(*shape, fn=torch.rand)
            self.noise = rand(*shape, fn=torch.rand)
            self.sldj = rand(b, dtype=torch.float32)
            return
        self.x = rand(*shape)
        if case.op == "squeeze":
            return
        self.s = rand(*shape, scale=0.5)
        self.t = rand(*shape, scale=0.5)
        self.scale = (0.5 + torch.rand(shape[1], generator=g)).to(device=device, dtype=dt)
        self.sldj = rand(b, dtype=torch.float32)
        self.parity = 0 if case.mask == "checkerboard" else -1
        self.mask = None
        if case.mask == "half":
            keep = (torch.arange(shape[1]) < shape[1] // 2).to(dt)
            self.mask = keep.reshape(shape[1], *([1] * (len(shape) - 2))).expand(shape[1:]).contiguous().to(device)
        self.gy = rand(*shape)
        self.gl = rand(b, dtype=torch.float32)


def make_call(case: Case, inp: Inputs, op_fn: Callable) -> Callable[[], object]:
    """A zero-argument callable running ``op_fn`` (an implementation with the normalised signature) on the case."""
    if case.op in ("coupling_fwd", "coupling_inv"):
        reverse = case.op == "coupling_inv"

        def call():
            with torch.no_grad():
                return op_fn(inp.x, inp.s, inp.t, inp.scale, inp.mask, inp.parity, reverse, inp.sldj)
        return call
    if case.op == "coupling_fwdbwd":
        leaves = [inp.x.detach().requires_grad_(), inp.s.detach().requires_grad_(), inp.t.detach().requires_grad_(),
                  inp.scale.detach().requires_grad_()]

        def call():
            y, sldj = op_fn(*leaves, inp.mask, inp.parity, False, inp.sldj)
            return torch.autograd.grad((y, sldj), leaves, (inp.gy, inp.gl))
        return call
    if case.op == "squeeze":
        return lambda: op_fn(inp.x, False, False)
    if case.op == "logit":
        def call():
            with torch.no_grad():
                return op_fn(inp.x, 0.05, False, inp.sldj, inp.noise)
        return call
    leaves = [inp.z.detach().requires_grad_(), inp.means.detach().requires_grad_(),
              inp.log_std.detach().requires_grad_()]

    def call():
        nll = op_fn(leaves[0], leaves[1], leaves[2], None, inp.labels, 1.0)
        return torch.autograd.grad(nll, leaves, inp.grad)
    return call


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def rel_error(out, ref) -> float:
    """max |out - ref| / max |ref| over all output tensors (float64)."""
    num, den = 0.0, 0.0
    for a, b in zip(_flat(out), _flat(ref)):
        a, b = a.detach().double(), b.detach().double()
        if a.shape != b.shape:
            return float("inf")
        if a.numel():
            num = max(num, float((a - b).abs().max()))
            den = max(den, float(b.abs().max()))
    return num / den if den > 0 else num


# ---------------------------------------------------------------------------------------------------- candidates
def _reference_fn(case: Case):
    name = _BACKEND_OP[case.op]
    fn = getattr(R, name)
    if name == "gmm_nll":
        return lambda *a: fn(*a, False)
    return fn


def _backend_fn(case: Case, backend: str, device: torch.device):
    name = _BACKEND_OP[case.op]
    with flowgmm_fast.use_backend(backend):
        fn = _backend.get_op(name, device)
    if name == "gmm_nll":
        return lambda *a: fn(*a, False)
    return fn


def fast_backends(device: torch.device) -> list[str]:
    """Backends other than the reference that run on ``device`` here (the Triton CPU interpreter is excluded: it is a
    test vehicle, not something to time)."""
    out = []
    for b in ("triton", "native"):
        if _backend.unavailable_reason(b) is not None or not _backend.device_supported(b, device.type):
            continue
        if b == "triton" and device.type != "cuda":
            continue
        out.append(b)
    return out


_ORIGINAL_MAX_FLOP = {"cpu": 3e9, "cuda": 2e12}


def candidates(case: Case, device: torch.device, backends: list[str], with_compile: bool) -> dict[str, Callable]:
    """name -> implementation with the normalised signature, for this case on this device."""
    cands: dict[str, Callable] = {EAGER: _reference_fn(case)}
    if with_compile:
        cands[COMPILE] = torch.compile(_reference_fn(case), dynamic=False)
    for b in backends:
        cands[b] = _backend_fn(case, b, device)
    if case.op == "gmm_fwdbwd":
        b, d, k = case.shape
        flop = k * (d ** 3 / 3 + 2 * b * d * d)  # K Choleskys + K triangular solves of the batch
        if flop <= _ORIGINAL_MAX_FLOP[device.type]:
            cands[ORIGINAL] = original_gmm_nll
    return cands


def _configure_dynamo() -> None:
    cfg = torch._dynamo.config
    for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                "accumulated_recompile_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), 1024))


def run_case(case: Case, device: torch.device, backends: list[str], with_compile: bool, copy_gbps: float,
             cpu_budget_s: float, cpu_rounds: int, cuda_rep_ms: int, cuda_rounds: int = 5) -> list[dict]:
    """Time every candidate of ``case``; one record per candidate (a failing candidate gets an ``error`` record)."""
    inp = Inputs(case, device)
    calls, errors, outputs = {}, {}, {}
    for name, fn in candidates(case, device, backends, with_compile).items():
        call = make_call(case, inp, fn)
        try:
            outputs[name] = call()
            common.sync(device)
            calls[name] = call
        except Exception as exc:  # recorded in the results file; the other candidates still run
            errors[name] = common.error_text(exc)
    stats = common.time_fns(calls, device, cpu_rounds=cpu_rounds, cpu_budget_s=cpu_budget_s,
                            cuda_rep_ms=cuda_rep_ms, paired=True, cuda_rounds=cuda_rounds) if calls else {}
    nbytes = min_bytes(case)
    eager = stats.get(EAGER, {}).get("median_ms")
    compiled = stats.get(COMPILE, {}).get("median_ms")
    base = {"op": case.op, "case": case.name, "shape": list(case.shape), "mask": case.mask, "dtype": case.dtype,
            "bytes": nbytes}
    records = []
    for name in list(calls) + list(errors):
        rec = dict(base, backend=name)
        if name in errors:
            rec["error"] = errors[name]
            records.append(rec)
            continue
        st = stats[name]
        med = st["median_ms"]
        gbps = nbytes / (med * 1e-3) / 1e9
        rec.update(st)
        paired = common.paired_ratio(st, stats[EAGER]) if EAGER in stats else None
        rec.update({
            "paired_vs_eager": paired["median"] if paired else None,
            "paired_vs_eager_q20": paired["q20"] if paired else None,
            "paired_vs_eager_q80": paired["q80"] if paired else None,
            "gbps": gbps,
            "pct_copy_bw": 100.0 * gbps / copy_gbps if copy_gbps else None,
            "x_eager": eager / med if eager else None,
            "x_compile": compiled / med if compiled else None,
            "rel_err_vs_eager": rel_error(outputs[name], outputs[EAGER]) if EAGER in outputs else None,
            "peak_mb": common.peak_memory_mb(calls[name], device) if device.type == "cuda" else None,
        })
        records.append(rec)
    return records


def print_table(records: list[dict], file=sys.stdout, header: bool = True) -> None:
    head = f"{'op':16s} {'case':26s} {'dtype':8s} {'backend':17s} {'median ms':>10s} {'[q20, q80]':>19s} " \
           f"{'GB/s':>7s} {'x eager':>8s} {'t/eager p':>9s} {'x compile':>9s} {'rel err':>8s}"
    if header:
        print(head, file=file)
    for r in records:
        if "error" in r:
            print(f"{r['op']:16s} {r['case']:26s} {r['dtype']:8s} {r['backend']:17s} ERROR {r['error'][:80]}",
                  file=file)
            continue
        q = f"[{common.fmt_ms(r['q20_ms'])}, {common.fmt_ms(r['q80_ms'])}]"
        xe = f"{r['x_eager']:.2f}" if r.get("x_eager") else "-"
        pe = f"{r['paired_vs_eager']:.3f}" if r.get("paired_vs_eager") is not None else "-"
        xc = f"{r['x_compile']:.2f}" if r.get("x_compile") else "-"
        err = f"{r['rel_err_vs_eager']:.1e}" if r.get("rel_err_vs_eager") is not None else "-"
        print(f"{r['op']:16s} {r['case']:26s} {r['dtype']:8s} {r['backend']:17s} {common.fmt_ms(r['median_ms']):>10s} "
              f"{q:>19s} {r['gbps']:7.1f} {xe:>8s} {pe:>9s} {xc:>9s} {err:>8s}", file=file, flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--suite", default=None, choices=("cpu", "gpu", "smoke"), help="default: gpu on CUDA, else cpu")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--backends", default=None, help="comma-separated subset of the fast backends (default: all here)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    p.add_argument("--budget", type=float, default=3.0, help="CPU: seconds of timing per case (all candidates)")
    p.add_argument("--rounds", type=int, default=15, help="CPU: rounds of side-by-side samples per case (max)")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench repetition time per candidate (ms)")
    p.add_argument("--gpu-rounds", type=int, default=5,
                   help="CUDA: rounds the repetition time is split into, candidates interleaved per round")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads for the run (default: torch's choice; recorded in the file)")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no new case after this many seconds; the results file says the run was cut short")
    args = p.parse_args(argv)
    started = time.monotonic()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    suite_name = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"--ops: unknown op(s) {bad}; expected a subset of {OPS}")
    here = fast_backends(device)
    if args.backends is None:
        backends = here
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        missing = [b for b in backends if b not in here]
        if missing:
            raise SystemExit(f"--backends: {missing} not usable on {device.type} here (usable: {here}; reasons: "
                             f"{ {b: _backend.unavailable_reason(b) for b in missing} })")
    if args.gpu_rounds < 1:
        raise SystemExit(f"--gpu-rounds must be >= 1, got {args.gpu_rounds}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    _configure_dynamo()
    torch.manual_seed(0)
    meta = common.run_metadata(device, [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
    copy = common.copy_bandwidth_gbps(device)
    print(f"# {meta['device']} | torch {meta['torch']} triton {meta['triton']} CUDA {meta['cuda']} | "
          f"commit {str(meta['git_commit'])[:8]}{' (dirty)' if meta['git_dirty'] else ''} | backends {backends} | "
          f"copy bandwidth {copy['gbps']:.1f} GB/s", flush=True)
    records: list[dict] = []
    cases = [c for c in suite(suite_name) if c.op in ops]
    skipped = []
    for i, case in enumerate(cases):
        if args.deadline_s is not None and time.monotonic() - started > args.deadline_s:
            skipped = [f"{c.op}/{c.name}/{c.dtype}" for c in cases[i:]]
            print(f"# deadline of {args.deadline_s:.0f} s reached: {len(skipped)} case(s) not run", flush=True)
            break
        recs = run_case(case, device, backends, not args.no_compile, copy["gbps"], args.budget, args.rounds,
                        args.rep_ms, args.gpu_rounds)
        print_table(recs, header=i == 0)
        records += recs
    extra = {"suite": suite_name, "copy_bandwidth": copy, "backends_timed": backends, "cases_not_run": skipped,
             "wall_s": time.monotonic() - started}
    result = {"meta": meta, "records": records, **extra}
    if not args.no_write:
        path = common.write_results("ops", meta, records, args.out_dir, extra=extra)
        print(f"# wrote {path}")
        result["path"] = str(path)
    return result


if __name__ == "__main__":
    main()
