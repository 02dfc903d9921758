"""The public coupling layer, forward + backward, one fast backend against the torch backend (issue 14's target).

``AffineCoupling(12, mask, st_net=nn.Conv2d(...1x1...))`` on (64, 12, 16, 16) for the channel and checkerboard masks
(the s/t net a 1x1 convolution, so the coupling itself and what surrounds it -- the chunk views of the s/t output,
the channel halves, the conditioning input -- is most of the step). One sample is the mean of ``inner`` back-to-back
steps (forward, ``(y^2).sum() + ldj.sum()``, backward); the candidates alternate A B A B ... with the order shuffled
per pair, and the figure is the median of the per-pair ratios t_torch / t_fast (above 1: the fast backend is
faster), so load from other processes on a shared machine hits both sides of a pair alike. Before timing, the two
backends' outputs and gradients are compared (``max_rel_err``).

    python -m benchmarks.bench_coupling_layer [--pairs 40] [--inner 10] [--threads N] [--backend native] [--no-write]
    python -m benchmarks.bench_coupling_layer --profile     # the profiler's op table of one step per mask, no timing

Writes ``results/coupling_layer_<device>_<UTC>_<commit>.json`` (``common.write_results``) with a summary per mask.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import torch
from torch import nn

from benchmarks import common

SHAPE = (64, 12, 16, 16)
MASKS = ("channel", "checkerboard")
TARGETS = {"channel": 1.3, "checkerboard": 1.6}  # issue 14: the layer's speed-up over the torch backend


def make_layer(mask: str, channels: int = SHAPE[1], seed: int = 0) -> nn.Module:
    from flowgmm_fast.nn import AffineCoupling

    torch.manual_seed(seed)
    n_cond = channels // 2 if mask == "channel" else channels
    return AffineCoupling(channels, mask, st_net=nn.Conv2d(n_cond, 2 * n_cond, 1))


def _step(layer: nn.Module, x: torch.Tensor, backend: str):
    from flowgmm_fast import use_backend

    with use_backend(backend):
        y, ldj = layer(x)
        (y.square().sum() + ldj.sum()).backward()
    return y, ldj


def max_rel_err(layer: nn.Module, x0: torch.Tensor, fast: str) -> float:
    """Largest relative error (max |a - b| / max |b|) of y, ldj and every gradient, fast backend vs torch."""
    outs = {}
    for backend in (fast, "torch"):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y, ldj = _step(layer, x, backend)
        outs[backend] = [y.detach(), ldj.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(outs[fast], outs["torch"]))


def time_pairs(layer: nn.Module, x: torch.Tensor, fast: str, pairs: int, inner: int, seed: int = 0) -> dict:
    """Per-pair ratios t_torch / t_fast of ``inner``-step samples, order shuffled per pair (one warm-up pair)."""

    def sample(backend):
        t0 = time.perf_counter()
        for _ in range(inner):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            _step(layer, x, backend)
        return (time.perf_counter() - t0) / inner

    for backend in (fast, "torch"):
        sample(backend)
    rng = random.Random(seed)
    times = {fast: [], "torch": []}
    ratios = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(pairs):
            order = [fast, "torch"]
            rng.shuffle(order)
            t = {b: sample(b) for b in order}
            for b in t:
                times[b].append(t[b])
            ratios.append(t["torch"] / t[fast])
    finally:
        if gc_was:
            gc.enable()
    return {"pairs": pairs, "inner": inner, "ratios": ratios, "median_ratio": statistics.median(ratios),
            "q20_ratio": common._quantile(sorted(ratios), 0.2), "q80_ratio": common._quantile(sorted(ratios), 0.8),
            f"median_{fast}_ms": 1e3 * statistics.median(times[fast]),
            "median_torch_ms": 1e3 * statistics.median(times["torch"])}


COPY_OPS = ("aten::contiguous", "aten::clone", "aten::copy_", "aten::cat")


def profile_step(layer: nn.Module, x: torch.Tensor, backend: str, steps: int = 3) -> str:
    """torch.profiler's op table (self CPU time) of ``steps`` forward + backward steps, then the copy-type ops
    (contiguous / clone / copy_ / cat) with their input shapes and the op that called them."""
    from torch.profiler import profile

    _step(layer, x, backend)
    with profile(record_shapes=True) as prof:
        for _ in range(steps):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            _step(layer, x, backend)
    lines = [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20),
             f"copy-type ops in {steps} steps (name, input shapes, caller):"]
    for ev in prof.events():
        if ev.name in COPY_OPS and (ev.cpu_parent is None or ev.cpu_parent.name not in COPY_OPS):
            caller = ev.cpu_parent.name if ev.cpu_parent is not None else "-"
            lines.append(f"  {ev.name} {ev.input_shapes} <- {caller}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--backend", default="native", help="the fast backend (native, or triton on a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    ap.add_argument("--batch", type=int, default=SHAPE[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the profiler's table of a step per mask, no timing")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.profile:
        for mask in args.masks:
            x = torch.randn((args.batch, *SHAPE[1:]), device=device).requires_grad_()
            print(f"== {mask}, backend {args.backend}\n{profile_step(make_layer(mask).to(device), x, args.backend)}")
        return {}
    meta = common.run_metadata(device, argv)
    records = []
    for mask in args.masks:
        layer = make_layer(mask).to(device)
        x = torch.randn((args.batch, *SHAPE[1:]), device=device).requires_grad_()
        rec = {"mask": mask, "shape": [args.batch, *SHAPE[1:]], "backend": args.backend,
               "st_net": repr(layer.st_net), "max_rel_err": max_rel_err(layer, x.detach(), args.backend)}
        rec.update(time_pairs(layer, x, args.backend, args.pairs, args.inner))
        rec["target"] = TARGETS[mask]
        records.append(rec)
        print(f"{mask:12s} {args.backend} vs torch: median paired ratio {rec['median_ratio']:.3f}x "
              f"(q20 {rec['q20_ratio']:.3f}, q80 {rec['q80_ratio']:.3f}; {args.pairs} pairs of {args.inner} steps; "
              f"{rec[f'median_{args.backend}_ms']:.2f} ms vs {rec['median_torch_ms']:.2f} ms; "
              f"target {rec['target']}x) max rel err {rec['max_rel_err']:.1e}")
    summary = {r["mask"]: {"median_ratio": r["median_ratio"], "target": r["target"],
                           "met": r["median_ratio"] >= r["target"]} for r in records}
    return common.finish_summary_run("coupling_layer", meta, records, summary, args.out_dir, not args.no_write)


if __name__ == "__main__":
    main()
