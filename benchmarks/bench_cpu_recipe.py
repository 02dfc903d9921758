"""The CPU image recipe's training step (``experiments/train_semisup_cons.py --preset mnist-cpu``): which execution
choices make it faster on a CPU, timed side by side.

One step is what the script does: the FlowGMM loss (forward, the prior; with ``--consistency W`` > 0 also a no-grad
forward of a second augmentation for the consistency target, as FlowGMM-cons), backward, gradient-norm clip 100 and
Adam, at the preset's model size and batch (half labeled; the preset has no consistency term). Variants, each its own model with the same initial weights and batch:

  torch          the pure-PyTorch reference ops (``use_backend("torch")``)
  native         the C++ extension's CPU kernels for the coupling, logit and GMM ops (what ``auto`` picks)
  channels_last  native, with model and inputs in channels-last memory format
  bf16           native under ``torch.autocast("cpu", torch.bfloat16)`` (the s/t networks in bf16)
  compile_st     native, every coupling's s/t network wrapped in ``torch.compile`` (the coupling ops stay eager)
  threads=N      native run with N torch threads (the others run with ``--threads``, default 1)

Figures: median and 20/80% quantiles of the step time over interleaved rounds (``common.time_interleaved``), the
speed-up over ``native``, the setup time (compilation), and the first step's loss (eager fp32 variants must agree).

Usage: ``python -m benchmarks.bench_cpu_recipe [--mid 16 --blocks 1 --batch 32] [--threads 1] [--rounds 6]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

import flowgmm_fast
from flowgmm_fast import FlowGMM
from flowgmm_fast.nn import AffineCoupling, GaussianMixture, RealNVP
from flowgmm_fast.training import flowgmm_cons_loss

from . import common
from .bench_ops import _configure_dynamo

VARIANTS = ("torch", "native", "channels_last", "bf16", "compile_st")


class RecipeStep:
    """One variant: model, Adam, a static batch (x, labels, x2) and the step of the recipe."""

    def __init__(self, variant: str, args, threads: int | None = None):
        self.variant, self.threads, self.base_threads = variant, threads, args.threads
        torch.manual_seed(0)
        flow = RealNVP(1, args.scales, args.mid, args.blocks, dequantize=False)
        self.model = FlowGMM(flow, GaussianMixture(10, 784)).train()
        g = torch.Generator().manual_seed(1)
        x = (torch.randint(0, 256, (args.batch, 1, 28, 28), generator=g).float() + 0.5) / 256
        x2 = (torch.randint(0, 256, (args.batch, 1, 28, 28), generator=g).float() + 0.5) / 256
        self.labels = torch.randint(0, 10, (args.batch,), generator=g)
        self.labels[args.batch // 2:] = -1
        if variant == "channels_last":
            self.model = self.model.to(memory_format=torch.channels_last)
            x, x2 = x.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
        if variant == "compile_st":
            for m in self.model.modules():
                if isinstance(m, AffineCoupling):
                    m.st_net = torch.compile(m.st_net)
        self.x, self.x2 = x, x2
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=1e-3)
        self.backend = "torch" if variant == "torch" else "native"
        self.consistency = args.consistency
        self.loss_first = None

    def step(self):
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.variant == "bf16"
                    else contextlib.nullcontext())
        try:
            with flowgmm_fast.use_backend(self.backend), autocast:
                loss, _, _ = flowgmm_cons_loss(self.model, self.x, self.labels, self.x2 if self.consistency else None,
                                               consistency_weight=self.consistency)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 100.0)
            self.opt.step()
        finally:
            if self.threads is not None:
                torch.set_num_threads(self.base_threads)
        return loss

    def setup(self):
        self.loss_first = float(self.step().detach())
        self.step()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mid", type=int, default=16, help="mid_channels of the RealNVP")
    p.add_argument("--blocks", type=int, default=1, help="num_blocks")
    p.add_argument("--scales", type=int, default=2, help="num_scales")
    p.add_argument("--batch", type=int, default=32, help="batch (half labeled)")
    p.add_argument("--consistency", type=float, default=0.0,
                   help="weight of the consistency term (> 0: the second forward of FlowGMM-cons is timed too)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every variant but threads=N")
    p.add_argument("--more-threads", type=int, nargs="*", default=[2], help="the threads=N variants")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; expected some of {VARIANTS}")
    if "native" not in flowgmm_fast.available_backends():
        raise SystemExit("the native backend is not available here (python -m flowgmm_fast says why)")
    torch.set_num_threads(args.threads)
    _configure_dynamo()
    device = torch.device("cpu")
    meta = common.run_metadata(device, [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
    meta["config"] = {"mid_channels": args.mid, "num_blocks": args.blocks, "num_scales": args.scales,
                      "batch": args.batch, "threads": args.threads, "consistency": args.consistency}
    print(f"# {meta['device']} | torch {meta['torch']} | commit {str(meta['git_commit'])[:8]} | {meta['config']}",
          flush=True)
    runners: dict[str, RecipeStep] = {}
    records: dict[str, dict] = {}
    names = [(v, None) for v in variants] + [(f"threads={n}", n) for n in args.more_threads]
    for name, threads in names:
        rec = records[name] = {"variant": name, **meta["config"]}
        try:
            runner = RecipeStep("native" if threads else name, args, threads)
            t0 = time.perf_counter()
            runner.setup()
            rec["setup_s"] = time.perf_counter() - t0
            rec["loss_first"] = runner.loss_first
            runners[name] = runner
        except Exception as exc:  # recorded; the other variants still run
            rec["error"] = common.error_text(exc)
    stats = common.time_interleaved({k: r.step for k, r in runners.items()}, warmup=0, rounds=args.rounds,
                                    sample_ms=1.0)
    ref = stats.get("native", {}).get("median_ms")
    print(f"{'variant':14s} {'median ms':>10s} {'[q20, q80]':>19s} {'x native':>9s} {'setup s':>8s} {'loss0':>10s}")
    for name, rec in records.items():
        if name in stats:
            rec.update(stats[name])
            rec["x_native"] = ref / rec["median_ms"] if ref else None
        if "error" in rec:
            print(f"{name:14s} ERROR {rec['error'][:100]}", flush=True)
            continue
        q = f"[{common.fmt_ms(rec['q20_ms'])}, {common.fmt_ms(rec['q80_ms'])}]"
        xn = f"{rec['x_native']:.2f}" if rec.get("x_native") else "-"
        print(f"{name:14s} {common.fmt_ms(rec['median_ms']):>10s} {q:>19s} {xn:>9s} {rec['setup_s']:8.1f} "
              f"{rec['loss_first']:10.6g}", flush=True)
    out = {"kind": "cpu_recipe", "meta": meta, "records": list(records.values())}
    if not args.no_write:
        path = common.write_results("cpu_recipe", meta, out["records"], out_dir=args.out_dir)
        print(f"# wrote {path}")
    return out


if __name__ == "__main__":
    main()
