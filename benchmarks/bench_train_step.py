"""Training-step benchmarks: one FlowGMM optimisation step (forward, prior NLL, backward, grad-norm clip 100, Adam)
per backend, with and without ``torch.compile`` (and CUDA graphs on the GPU), plus the original code's formulation.

Configs (``--suite gpu``: the paper's sizes):
  mnist    RealNVP(1 channel, num_scales=2, mid_channels=64, num_blocks=8), 28x28, batch 64, K=10
  cifar    RealNVP(3 channels, 2, 64, 8), 32x32, batch 64, K=10
  tabular  RealNVPTabular(768, 7 couplings, hidden 1024, dropout 0.5), batch 5000, K=4 (AG-News text embeddings)
``--suite cpu`` scales them down to run on a 2-core CPU in minutes -- the ``-cpu`` configs below say how; their step
times are NOT those of the paper's models: mnist-cpu and cifar-cpu (mid_channels 32, num_blocks 2, batch 32),
tabular-cpu (batch 1000); the image ones skip the torch.compile variants (compiling a whole RealNVP step
takes minutes on 2 cores). Half of each batch is labeled, half unlabeled (label -1), as in the original.

Variants: ``eager``; ``compile`` (``torch.compile`` of the loss: forward + prior; backward through AOTAutograd);
on CUDA also ``cudagraph`` (the whole eager step -- forward, backward, clip, Adam -- captured once in a CUDA graph and
replayed) and ``compile+cudagraph`` (``mode="reduce-overhead"``). Backends: ``torch`` (the reference), ``triton`` /
``native`` where available, and ``original``: the torch backend run the original code's way (full-covariance prior
rebuilt per call, a NaN check per coupling layer; :mod:`benchmarks.baseline_original`), eager only.

Figures: median and 20/80% quantiles of the step time (ms), speed-ups over torch-eager and over the original, peak
extra CUDA memory of a step (including a CUDA graph's capture), and the first step's loss (same seed and data for every
variant of a config: eager variants must agree).

Usage: ``python -m benchmarks.bench_train_step --suite cpu`` (or ``gpu`` / ``smoke``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

import flowgmm_fast
from flowgmm_fast import FlowGMM
from flowgmm_fast.nn import GaussianMixture, RealNVP, RealNVPTabular

from . import common
from .baseline_original import OriginalFormulation
from .bench_ops import _configure_dynamo, fast_backends


@dataclass(frozen=True)
class StepConfig:
    """A FlowGMM training-step configuration: ``kind`` "image" ((C, H, W) = shape) or "tabular" ((D,) = shape)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    batch: int
    num_classes: int
    mid_channels: int = 64
    num_blocks: int = 8
    hidden_dim: int = 1024
    num_couplings: int = 7
    note: str = ""
    compile_variants: bool = True

    def build(self) -> FlowGMM:
        if self.kind == "image":
            c, h, w = self.shape
            flow = RealNVP(c, num_scales=2, mid_channels=self.mid_channels, num_blocks=self.num_blocks)
            prior = GaussianMixture(self.num_classes, c * h * w)
            return FlowGMM(flow, prior, event_shape=self.shape)
        flow = RealNVPTabular(self.shape[0], self.num_couplings, self.hidden_dim, num_layers=1, dropout=0.5)
        prior = GaussianMixture(self.num_classes, self.shape[0], means_init="tabular", std=1.3133)
        return FlowGMM(flow, prior)

    def data(self, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        if self.kind == "image":
            x = torch.randint(0, 256, (self.batch, *self.shape), generator=g).float() / 256
        else:
            x = torch.randn(self.batch, *self.shape, generator=g)
        labels = torch.randint(0, self.num_classes, (self.batch,), generator=g)
        labels[self.batch // 2:] = -1
        return x.to(device), labels.to(device)


CONFIGS = {
    "mnist": StepConfig("mnist", "image", (1, 28, 28), 64, 10),
    "cifar": StepConfig("cifar", "image", (3, 32, 32), 64, 10),
    "tabular": StepConfig("tabular", "tabular", (768,), 5000, 4),
    "mnist-cpu": StepConfig("mnist-cpu", "image", (1, 28, 28), 32, 10, mid_channels=32, num_blocks=2,
                            note="scaled down for the CPU: mid_channels 32, num_blocks 2, batch 32; no torch.compile "
                                 "variants (compiling the whole RealNVP step takes minutes on 2 cores)",
                            compile_variants=False),
    "cifar-cpu": StepConfig("cifar-cpu", "image", (3, 32, 32), 32, 10, mid_channels=32, num_blocks=2,
                            note="scaled down for the CPU: mid_channels 32, num_blocks 2, batch 32; no torch.compile "
                                 "variants (compiling the whole RealNVP step takes minutes on 2 cores)",
                            compile_variants=False),
    "tabular-cpu": StepConfig("tabular-cpu", "tabular", (768,), 1000, 4,
                              note="scaled down for the CPU: batch 1000 (hidden 1024, 7 couplings as in the paper)"),
    "smoke-image": StepConfig("smoke-image", "image", (1, 4, 4), 4, 3, mid_channels=4, num_blocks=1, note="smoke"),
    "smoke-tabular": StepConfig("smoke-tabular", "tabular", (6,), 8, 2, hidden_dim=8, num_couplings=2, note="smoke"),
}
SUITES = {"gpu": ("cifar", "mnist", "tabular"), "cpu": ("mnist-cpu", "cifar-cpu", "tabular-cpu"),
          "smoke": ("smoke-image", "smoke-tabular")}


class Runner:
    """One (config, backend, variant): its own model (same initial weights for every runner of a config), optimiser
    and static batch. ``step()`` runs one training step; ``setup()`` runs the first (compiling / capturing)."""

    def __init__(self, cfg: StepConfig, backend: str, variant: str, device: torch.device):
        self.cfg, self.backend, self.variant, self.device = cfg, backend, variant, device
        torch.manual_seed(0)
        self.model = cfg.build().to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        lr = 1e-3 if cfg.kind == "image" else 3e-4
        opt_cls = torch.optim.Adam if cfg.kind == "image" else torch.optim.AdamW
        self.opt = opt_cls(self.params, lr=lr, capturable=device.type == "cuda")
        self.x, self.labels = cfg.data(device)
        self.backend_name = "torch" if backend == "original" else backend
        if backend == "original":
            net = OriginalFormulation(self.model)
            self.loss_fn = lambda x, y: net(x, y).mean()
        else:
            model = self.model
            self.loss_fn = lambda x, y: model(x, y).nll.mean()
        if variant == "compile":
            self.loss_fn = torch.compile(self.loss_fn)
        elif variant == "compile+cudagraph":
            self.loss_fn = torch.compile(self.loss_fn, mode="reduce-overhead")
        self.graph = None
        self.loss_first = None

    def _eager_step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.x, self.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 100.0)
        self.opt.step()
        return loss

    def setup(self) -> None:
        torch.manual_seed(1)
        with flowgmm_fast.use_backend(self.backend_name):
            if self.variant != "cudagraph":
                self.loss_first = float(self._eager_step().detach())
                self._eager_step()
                return
            # whole-step capture (PyTorch's documented recipe): warm up on a side stream, then capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(3):
                    loss = self._eager_step()
                    if i == 0:
                        self.loss_first = float(loss.detach())
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.static_loss = self.loss_fn(self.x, self.labels)
                self.static_loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, 100.0)
                self.opt.step()

    def step(self):
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss
        with flowgmm_fast.use_backend(self.backend_name):
            return self._eager_step()


def variants_for(device: torch.device, with_compile: bool) -> list[str]:
    out = ["eager"]
    if device.type == "cuda":
        out.append("cudagraph")
    if with_compile:
        out.append("compile")
        if device.type == "cuda":
            out.append("compile+cudagraph")
    return out


def run_config(cfg: StepConfig, device: torch.device, backends: list[str], variants: list[str], *,
               cpu_rounds: int, cuda_rep_ms: int, deadline: float | None = None) -> list[dict]:
    """Time every (backend, variant) of ``cfg``; one record each (failures are recorded, not raised). Runners are
    set up eager ones first; past ``deadline`` (a time.monotonic() value) no further runner is set up."""
    runners: dict[str, Runner] = {}
    records: dict[str, dict] = {}
    order = [(b, v) for v in variants for b in ["torch", *backends]]
    order.insert(len(backends) + 1, ("original", "eager"))
    for backend, variant in order:
        key = f"{backend}/{variant}"
        rec = {"config": cfg.name, "note": cfg.note, "batch": cfg.batch, "shape": list(cfg.shape),
               "backend": backend, "variant": variant}
        records[key] = rec
        if deadline is not None and time.monotonic() > deadline:
            rec["error"] = "not run: the run's deadline was reached"
            continue
        try:
            runner = Runner(cfg, backend, variant, device)
            t0 = time.perf_counter()
            rec["peak_mb"] = common.peak_memory_mb(runner.setup, device)
            common.sync(device)
            rec["setup_s"] = time.perf_counter() - t0
            rec["loss_first"] = runner.loss_first
            runners[key] = runner
        except Exception as exc:  # e.g. a graph break under capture: recorded, the other variants still run
            rec["error"] = common.error_text(exc)
    if device.type == "cuda":
        for key, runner in runners.items():
            peak = common.peak_memory_mb(runner.step, device)
            records[key]["peak_mb"] = max(records[key]["peak_mb"] or 0.0, peak)
    budget = None if deadline is None else max(deadline - time.monotonic(), 1.0)  # rounds shrink to fit (>= 3)
    stats = common.time_fns({k: r.step for k, r in runners.items()}, device, cpu_rounds=cpu_rounds, cpu_warmup=0,
                            cpu_budget_s=budget, cuda_rep_ms=cuda_rep_ms)  # setup() already ran two steps
    eager = stats.get("torch/eager", {}).get("median_ms")
    original = stats.get("original/eager", {}).get("median_ms")
    for key, st in stats.items():
        rec = records[key]
        rec.update(st)
        rec["x_eager"] = eager / st["median_ms"] if eager else None
        rec["x_original"] = original / st["median_ms"] if original else None
    return list(records.values())


def print_table(records: list[dict], file=sys.stdout, header: bool = True) -> None:
    if header:
        print(f"{'config':14s} {'backend':9s} {'variant':18s} {'median ms':>10s} {'[q20, q80]':>19s} {'x eager':>8s} "
              f"{'x orig':>7s} {'peak MB':>8s} {'loss0':>10s}", file=file)
    for r in records:
        if "error" in r:
            print(f"{r['config']:14s} {r['backend']:9s} {r['variant']:18s} ERROR {r['error'][:90]}", file=file)
            continue
        q = f"[{common.fmt_ms(r['q20_ms'])}, {common.fmt_ms(r['q80_ms'])}]"
        xe = f"{r['x_eager']:.2f}" if r.get("x_eager") else "-"
        xo = f"{r['x_original']:.2f}" if r.get("x_original") else "-"
        pk = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
        lf = f"{r['loss_first']:.4g}" if r.get("loss_first") is not None else "-"
        print(f"{r['config']:14s} {r['backend']:9s} {r['variant']:18s} {common.fmt_ms(r['median_ms']):>10s} {q:>19s} "
              f"{xe:>8s} {xo:>7s} {pk:>8s} {lf:>10s}", file=file, flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--suite", default=None, choices=tuple(SUITES), help="default: gpu on CUDA, else cpu")
    p.add_argument("--configs", default=None, help=f"comma-separated configs instead of the suite's: {tuple(CONFIGS)}")
    p.add_argument("--backends", default=None, help="comma-separated subset of the fast backends (default: all here)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--rounds", type=int, default=5, help="CPU: side-by-side rounds per config")
    p.add_argument("--rep-ms", type=int, default=500, help="CUDA: do_bench repetition time per variant (ms)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads for the run (default: torch's choice; recorded in the file)")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of eager,compile (and cudagraph,compile+cudagraph on CUDA)")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="set up no new runner after this many seconds; the records say what was not run")
    args = p.parse_args(argv)
    started = time.monotonic()
    deadline = None if args.deadline_s is None else started + args.deadline_s

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    suite_name = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    names = [c.strip() for c in args.configs.split(",")] if args.configs else list(SUITES[suite_name])
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; expected some of {tuple(CONFIGS)}")
    here = fast_backends(device)
    backends = here if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    missing = [b for b in backends if b not in here]
    if missing:
        raise SystemExit(f"--backends: {missing} not usable on {device.type} here (usable: {here})")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    _configure_dynamo()
    meta = common.run_metadata(device, [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
    print(f"# {meta['device']} | torch {meta['torch']} | commit {str(meta['git_commit'])[:8]} | backends {backends}",
          flush=True)
    variants = variants_for(device, not args.no_compile)
    if args.variants is not None:
        asked = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in asked if v not in variants_for(device, True)]
        if bad:
            raise SystemExit(f"--variants: {bad} not available on {device.type}; expected some of "
                             f"{variants_for(device, True)}")
        variants = [v for v in variants if v in asked]
    if "eager" not in variants:
        variants.insert(0, "eager")  # the reference every ratio is taken against
    records: list[dict] = []
    for i, name in enumerate(names):
        cfg = CONFIGS[name]
        cfg_variants = variants if cfg.compile_variants else [v for v in variants if "compile" not in v]
        # each config gets an equal share of the time left, so a slow one cannot starve the next
        share = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(names) - i)
        recs = run_config(cfg, device, backends, cfg_variants, cpu_rounds=args.rounds, cuda_rep_ms=args.rep_ms,
                          deadline=share)
        print_table(recs, header=i == 0)
        records += recs
    result = {"meta": meta, "suite": suite_name, "records": records}
    if not args.no_write:
        extra = {"suite": suite_name, "backends_timed": backends, "wall_s": time.monotonic() - started}
        path = common.write_results("train_step", meta, records, args.out_dir, extra=extra)
        print(f"# wrote {path}")
        result["path"] = str(path)
    return result


if __name__ == "__main__":
    main()
