"""The correctness half of the one-shot GPU check (issue 14): what the test suite does not already give, at the real
sizes, written as ONE results file (``gpu_check_<device>_<date>_<commit>.json``, kind "gpu_check") plus a log.

Checks, each recorded as pass / fail / skip with a reason:

``parity/<case>/<backend>/<dtype>``
    the triton and native backends (whichever run on the device) in fp32 and bf16 against a float64 reference (the
    "torch" backend on float64 copies of the same inputs), forward outputs and every gradient (of sum(out * c) with
    fixed random cotangents c). Per output / gradient: ``err`` = max |kernel - ref64| / max |ref64|, and ``torch_err``
    the same for the torch backend run in the same dtype (fp32: PyTorch in fp32; bf16: PyTorch's fp32 computation
    rounded to bf16, which is what the kernels promise). ``ratio`` = err / max(torch_err, eps), eps = the dtype's
    machine epsilon (so an exact op, e.g. the squeeze, is not divided by zero). Bound: ratio <= 4.
``repeat/<case>/<backend>``
    the same fp32 forward + backward twice gives identical bits (outputs and every gradient).
``edge/...``
    a GMM row whose logits are all -inf (z = 1e20 in fp32: |z|^2 overflows, every log N is -inf); labels outside
    [-1, K) (NaN poison from the ops; an error from the functional API where it checks); native ops on odd shapes
    (3, 5, 7, 7) against the reference, and the same under ``compute-sanitizer --tool memcheck`` on CUDA.
``train/<model>/<backend>/{compile,cudagraph,repeat}``
    one training step of a small RealNVP and RealNVPTabular FlowGMM: under ``torch.compile(fullgraph=True)``
    (inductor on CUDA, aot_eager on the CPU) against eager; on CUDA the whole step (forward, backward, clip, SGD)
    captured in a CUDA graph and replayed from the same weights against eager; and two eager steps bit-identical.

Usage (repository root):
    python -m benchmarks.gpu_check --out DIR                 # on a CUDA machine, the issue's sizes
    python -m benchmarks.gpu_check --cpu-dry-run --out DIR   # the same code paths on the CPU, tiny shapes; Triton
                                                             # under its interpreter (about a minute on 2 cores)
Exit status 1 when any check fails (2 when no CUDA device and no --cpu-dry-run). ``--only SUBSTR`` runs the checks
whose names contain one of the comma-separated substrings; ``--deadline-s`` skips (with that reason) the checks not
started in time, so a capped run still writes its file. benchmarks/gpu_check.sh runs it (``--cpu-dry-run`` there too).
"""

from __future__ import annotations

import os
import sys

if "--cpu-dry-run" in sys.argv:  # the interpreter must be chosen before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import copy
import json
import math
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import flowgmm_fast as ff
from flowgmm_fast import _backend, debug
from flowgmm_fast import functional as F

from . import common

FAST = ("triton", "native")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RATIO_BOUND = 4.0
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}


class Skip(Exception):
    """A check that cannot run here; the message is the reason recorded."""


# ------------------------------------------------------------------------------------------------ parity cases

@dataclass
class Case:
    """An op (or module) call at one size: ``make(device)`` -> dict of fp32 tensors / modules / int tensors (the
    values, made once); ``call(vals)`` -> tuple of outputs under the current backend; ``grads``: names of the
    tensors differentiated (every parameter of a module value is too)."""

    name: str
    shape: str
    make: Callable[[torch.device], dict]
    call: Callable[[dict], tuple]
    grads: tuple[str, ...]


def _rand(gen, *shape, scale=1.0, kind="randn"):
    fn = torch.randn if kind == "randn" else torch.rand
    return fn(*shape, generator=gen) * scale


def _gmm_case(name, b, d, k, diag):
    def make(device):
        g = torch.Generator().manual_seed(1)
        labels = torch.randint(0, k, (b,), generator=g)
        labels[torch.rand(b, generator=g) < 0.5] = -1
        vals = {"z": _rand(g, b, d), "means": _rand(g, k, d, scale=0.5),
                "log_std": _rand(g, *((k, d) if diag else (k,)), scale=0.1), "weight_logits": _rand(g, k),
                "labels": labels}
        return {n: v.to(device) for n, v in vals.items()}

    def call(v):
        return F.gmm_nll(v["z"], v["means"], v["log_std"], v["weight_logits"], labels=v["labels"], label_weight=2.0,
                         return_logits=True)

    return Case(name, f"B={b} D={d} K={k} {'diag' if diag else 'iso'}", make, call,
                ("z", "means", "log_std", "weight_logits"))


def _coupling_case(name, shape, mask, reverse=False):
    def make(device):
        g = torch.Generator().manual_seed(2)
        vals = {"x": _rand(g, *shape), "s": _rand(g, *shape), "t": _rand(g, *shape),
                "scale": _rand(g, shape[1], kind="rand") + 0.5, "sldj": _rand(g, shape[0])}
        if mask == "half":  # RealNVPTabular's vector mask
            vals["mask"] = (torch.arange(shape[1]) < shape[1] // 2).float()
        return {n: v.to(device) for n, v in vals.items()}

    def call(v):
        m = F.checkerboard(0) if mask == "checkerboard" else v["mask"].to(v["x"].dtype)
        return F.affine_coupling(v["x"], v["s"], v["t"], v["scale"], m, reverse, v["sldj"])

    return Case(name, f"{tuple(shape)} {mask}{' reverse' if reverse else ''}", make, call,
                ("x", "s", "t", "scale", "sldj"))


def _module_coupling_case(name, shape):
    """AffineCoupling(C, "channel", st_net=<a 1x1 conv>): the public layer, chunk views and all."""
    c = shape[1]

    def make(device):
        torch.manual_seed(3)
        from flowgmm_fast.nn import AffineCoupling

        layer = AffineCoupling(c, "channel", st_net=nn.Conv2d(c // 2, c, 1))
        g = torch.Generator().manual_seed(3)
        return {"x": _rand(g, *shape).to(device), "layer": layer.to(device)}

    def call(v):
        return v["layer"](v["x"])

    return Case(name, f"{tuple(shape)} channel, AffineCoupling", make, call, ("x",))


def _logit_case(name, shape):
    def make(device):
        g = torch.Generator().manual_seed(4)
        vals = {"x": _rand(g, *shape, kind="rand"), "noise": _rand(g, *shape, kind="rand"),
                "sldj": _rand(g, shape[0])}
        return {n: v.to(device) for n, v in vals.items()}

    def call(v):
        return F.logit_transform(v["x"], 0.05, False, v["sldj"], noise=v["noise"])

    return Case(name, f"{tuple(shape)} with noise", make, call, ("x", "sldj"))


def _squeeze_case(name, shape, alt_order):
    def make(device):
        return {"x": _rand(torch.Generator().manual_seed(5), *shape).to(device)}

    def call(v):
        return (F.squeeze2x2(v["x"], False, alt_order),)

    return Case(name, f"{tuple(shape)}{' alt_order' if alt_order else ''}", make, call, ("x",))


def parity_cases(dry: bool) -> list[Case]:
    """The issue's sizes; the dry run keeps each case's structure at a few hundred elements."""
    if dry:
        gmm, tall, ckbd, chan, vec, ctall, logit, sq28, sq32 = (
            (8, 48, 10), (64, 8, 10), (2, 3, 8, 8), (2, 12, 4, 4), (4, 96), (64, 8), (2, 3, 8, 8), (1, 1, 28, 28),
            (1, 3, 32, 32))
    else:
        gmm, tall, ckbd, chan, vec, ctall, logit, sq28, sq32 = (
            (4096, 3072, 10), (100_000, 8, 10), (64, 3, 32, 32), (64, 12, 16, 16), (256, 768), (100_000, 8),
            (64, 3, 32, 32), (64, 1, 28, 28), (64, 3, 32, 32))
    return [
        _gmm_case("gmm-iso", *gmm, diag=False),
        _gmm_case("gmm-diag", *gmm, diag=True),
        _gmm_case("gmm-tall", *tall, diag=True),
        _coupling_case("coupling-ckbd", ckbd, "checkerboard"),
        _coupling_case("coupling-ckbd-rev", ckbd, "checkerboard", reverse=True),
        _module_coupling_case("coupling-channel-module", chan),
        _coupling_case("coupling-vec", vec, "half"),
        _coupling_case("coupling-tall", ctall, "half"),
        _logit_case("logit", logit),
        _squeeze_case("squeeze-28", sq28, False),
        _squeeze_case("squeeze-28-alt", sq28, True),
        _squeeze_case("squeeze-32", sq32, False),
        _squeeze_case("squeeze-32-alt", sq32, True),
    ]


def _cast(vals: dict, dtype: torch.dtype) -> dict:
    """Copies in ``dtype`` (floating tensors and modules; integer tensors as they are), detached leaves."""
    out = {}
    for n, v in vals.items():
        if isinstance(v, nn.Module):
            out[n] = copy.deepcopy(v).to(dtype)
        elif v.is_floating_point():
            # a running log-det is float32 or float64, never half (functional.affine_coupling's contract)
            dt = torch.float32 if n == "sldj" and dtype != torch.float64 else dtype
            out[n] = v.detach().to(dt).clone()
        else:
            out[n] = v
    return out


def run_case(case: Case, vals: dict, backend: str, fault: float = 0.0):
    """Outputs and gradients (names -> tensors) of ``case`` on ``vals`` under ``backend``. ``fault`` (hidden option
    --inject-fault) scales the outputs by 1 + fault, a wrong kernel the checks must catch."""
    leaves = {}
    for n in case.grads:
        leaves[n] = vals[n].requires_grad_(True)
    for n, v in vals.items():
        if isinstance(v, nn.Module):
            for pn, p in v.named_parameters():
                leaves[f"{n}.{pn}"] = p
    with ff.use_backend(backend):
        outs = case.call(vals)
        if fault:
            outs = tuple(o * (1 + fault) for o in outs)
        gen = torch.Generator().manual_seed(7)
        cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]
        loss = sum((o.double() * c).sum() for o, c in zip(outs, cots))
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    result.update({f"grad {n}": g for n, g in zip(leaves, grads) if g is not None})
    return result


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((out.double() - ref).abs().max()) if ref.numel() else 0.0
    return err / scale if scale > 0 else err


# ------------------------------------------------------------------------------------------------ the runner

@dataclass
class Checker:
    out_dir: Path
    meta: dict
    deadline: float
    only: list[str] | None
    records: list[dict] = field(default_factory=list)
    path: Path | None = None

    def wanted(self, name: str) -> bool:
        return not self.only or any(s in name for s in self.only)

    def run(self, name: str, fn: Callable[[], tuple[str, str, dict]]) -> dict | None:
        if not self.wanted(name):
            return None
        t0 = time.perf_counter()
        if time.monotonic() > self.deadline:
            status, reason, details = "skip", "deadline: not started within --deadline-s", {}
        else:
            try:
                status, reason, details = fn()
            except Skip as exc:
                status, reason, details = "skip", str(exc), {}
            except Exception as exc:  # noqa: BLE001 -- a crash is a failed check, recorded; the other checks still run
                status, reason, details = "fail", common.error_text(exc), {"traceback": traceback.format_exc()[-2000:]}
        rec = {"name": name, "status": status, "reason": reason, "seconds": round(time.perf_counter() - t0, 3),
               **({"details": details} if details else {})}
        self.records.append(rec)
        print(f"[{status:4s}] {name}  ({rec['seconds']:.1f} s)  {reason}", flush=True)
        if status == "fail" and details:
            for q, d in details.get("quantities", {}).items():
                if not d.get("ok", True):
                    print(f"         {q}: {d}", flush=True)
        self.write()
        return rec

    def summary(self) -> dict:
        counts = {s: sum(r["status"] == s for r in self.records) for s in ("pass", "fail", "skip")}
        return {**counts, "failed": [r["name"] for r in self.records if r["status"] == "fail"]}

    def write(self) -> None:
        """Rewritten after every check, so a run cut off by a timeout still leaves what it did."""
        self.path = common.results_path("gpu_check", self.meta, self.out_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"kind": "gpu_check", "meta": self.meta, "bounds": {"ratio": RATIO_BOUND},
                   "summary": self.summary(), "records": self.records}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n")
        tmp.replace(self.path)


def fast_backends(device: torch.device) -> dict[str, str | None]:
    """backend -> None if it runs on ``device`` here, else the reason it does not."""
    out = {}
    for b in FAST:
        reason = _backend.unavailable_reason(b)
        if reason is None and not _backend.device_supported(b, device.type):
            reason = f"backend {b!r} does not run on {device.type} tensors here"
        out[b] = reason
    return out


def parity_checks(ck: Checker, device: torch.device, dry: bool, fault: float) -> None:
    backends = fast_backends(device)
    for case in parity_cases(dry):
        names = [f"parity/{case.name}/{b}/{dn}" for b in FAST for dn in DTYPES]
        names += [f"repeat/{case.name}/{b}" for b in FAST]
        if any(ck.wanted(n) for n in names):
            parity_case(ck, case, names, device, backends, fault)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def parity_case(ck: Checker, case: Case, names: list[str], device: torch.device, backends: dict, fault: float):
    try:
        base = case.make(device)
        ref = run_case(case, _cast(base, torch.float64), "torch")
        same = {dn: run_case(case, _cast(base, dt), "torch") for dn, dt in DTYPES.items()}
    except Exception as exc:  # noqa: BLE001 -- the reference itself failed: every check of the case fails, saying so
        for n in names:
            ck.run(n, lambda exc=exc: ("fail", f"reference run failed: {common.error_text(exc)}", {}))
        return
    first: dict[str, dict] = {}

    def check(b, dn, dt):
        if backends[b] is not None:
            raise Skip(backends[b])
        got = run_case(case, _cast(base, dt), b, fault)
        if dn == "fp32":
            first[b] = got
        quantities, ok = {}, True
        for q, r in ref.items():
            if q not in got:
                quantities[q] = {"ok": False, "error": "no value from the backend"}
                ok = False
                continue
            err, terr = rel_err(got[q], r), rel_err(same[dn][q], r)
            ratio = err / max(terr, EPS[dt])
            good = math.isfinite(ratio) and ratio <= RATIO_BOUND
            ok &= good
            quantities[q] = {"err": err, "torch_err": terr, "ratio": round(ratio, 4), "ok": good}
        worst = max(quantities, key=lambda q: quantities[q].get("ratio", math.inf))
        reason = f"{case.shape}: worst {worst} ratio {quantities[worst].get('ratio')} (bound {RATIO_BOUND})"
        return ("pass" if ok else "fail"), reason, {"shape": case.shape, "quantities": quantities}

    def repeat(b):
        if backends[b] is not None:
            raise Skip(backends[b])
        one = first.get(b) or run_case(case, _cast(base, torch.float32), b, fault)
        two = run_case(case, _cast(base, torch.float32), b, fault)
        differ = [q for q in one if not torch.equal(one[q], two[q])]
        if differ:
            return "fail", f"{case.shape}: bits differ between two runs in {differ}", {"differ": differ}
        return "pass", f"{case.shape}: {len(one)} outputs/gradients bit-identical", {}

    for b in FAST:
        for dn, dt in DTYPES.items():
            ck.run(f"parity/{case.name}/{b}/{dn}", lambda b=b, dn=dn, dt=dt: check(b, dn, dt))
    for b in FAST:
        ck.run(f"repeat/{case.name}/{b}", lambda b=b: repeat(b))


# ------------------------------------------------------------------------------------------------ edge cases

def _ops_module(backend: str):
    return _backend._loaded[backend] if backend in _backend._loaded else _backend._load(backend)


def _small_gmm(device, gen_seed=11, b=6, d=5, k=3):
    g = torch.Generator().manual_seed(gen_seed)
    return (torch.randn(b, d, generator=g).to(device), torch.randn(k, d, generator=g).to(device),
            (0.1 * torch.randn(k, generator=g)).to(device), torch.randn(k, generator=g).to(device))


def edge_checks(ck: Checker, device: torch.device) -> None:
    backends = fast_backends(device)

    for b in FAST:
        def all_inf_row(b=b):
            """Row 1 has z = 1e20 (fp32): |z - mu|^2 overflows, so every component's log N is -inf. Expected (the
            reference's semantics): that row's nll = +inf (not NaN) and its logits all -inf; the other rows' nll,
            logits and z-gradients finite and equal to the torch backend's. The row's own gradients and the
            parameter gradients (sums over rows) are not defined (softmax of an all -inf row) and not checked."""
            if backends[b] is not None:
                raise Skip(backends[b])
            z, means, log_std, wl = _small_gmm(device)
            z[1] = 1e20
            labels = torch.tensor([-1, -1, 0, 2, -1, 1], device=device)
            res = {}
            for name in ("torch", b):
                zz = z.clone().requires_grad_(True)
                with ff.use_backend(name):
                    nll, logits = F.gmm_nll(zz, means, log_std, wl, labels=labels, return_logits=True)
                (gz,) = torch.autograd.grad(nll.sum(), (zz,))
                res[name] = (nll.detach().cpu(), logits.detach().cpu(), gz.cpu())
            nll, logits, gz = res[b]
            tn, tl, tg = res["torch"]
            others = torch.tensor([i != 1 for i in range(z.shape[0])])
            problems = []
            if not (math.isinf(float(nll[1])) and float(nll[1]) > 0):
                problems.append(f"nll of the row is {float(nll[1])}, expected +inf")
            if not bool((logits[1] == -math.inf).all()):
                problems.append(f"logits of the row are {logits[1].tolist()}, expected all -inf")
            for what, got, want in (("nll", nll[others], tn[others]), ("logits", logits[others], tl[others]),
                                    ("z-gradient", gz[others], tg[others])):
                if not bool(torch.isfinite(got).all()):
                    problems.append(f"other rows' {what} not finite")
                elif not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                    problems.append(f"other rows' {what} differ from torch's by {float((got - want).abs().max()):.3g}")
            details = {"nll_row": float(nll[1]), "row_grad_finite": bool(torch.isfinite(gz[1]).all())}
            if problems:
                return "fail", "; ".join(problems), details
            return "pass", "nll +inf, logits -inf on the row; other rows finite and equal to torch's", details

        ck.run(f"edge/gmm-all-inf-row/{b}", all_inf_row)

    for b in ("torch",) + FAST:
        def bad_labels(b=b):
            """Labels -2 and K through the backend op (below the functional API's check): those rows' nll and
            z-gradients are NaN (never read as an index), the other rows equal the reference's. Through the
            functional API: ValueError naming labels on the CPU; on CUDA the same NaN poison (no host sync), and
            ValueError again in debug mode."""
            if b != "torch" and backends[b] is not None:
                raise Skip(backends[b])
            z, means, log_std, wl = _small_gmm(device)
            k = means.shape[0]
            labels = torch.tensor([-1, -2, 0, k, 2, -1], device=device)
            bad = torch.tensor([False, True, False, True, False, False])
            res = {}
            for name in ("torch", b):
                op = _ops_module(name).gmm_nll
                zz = z.clone().requires_grad_(True)
                nll = op(zz, means, log_std, wl, labels, 1.5, False)
                (gz,) = torch.autograd.grad(nll.sum(), (zz,))
                res[name] = (nll.detach().cpu(), gz.cpu())
            nll, gz = res[b]
            problems = []
            if not bool(nll[bad].isnan().all()) or not bool(gz[bad].isnan().all()):
                problems.append(f"bad-label rows: nll {nll[bad].tolist()}, z-grad NaN {gz[bad].isnan().all().item()}")
            if not torch.allclose(nll[~bad], res["torch"][0][~bad], rtol=1e-4, atol=1e-5) or \
                    not torch.allclose(gz[~bad], res["torch"][1][~bad], rtol=1e-4, atol=1e-5):
                problems.append("valid rows differ from the reference")
            with ff.use_backend(b):
                api = []
                for dbg in ((False, True) if device.type == "cuda" else (False,)):
                    debug.enable(dbg)
                    try:
                        out = F.gmm_nll(z, means, log_std, wl, labels=labels)
                        api.append(f"debug={dbg}: no error, NaN rows {out.isnan().cpu().tolist()}")
                        expected_error = device.type == "cpu" or dbg
                        if expected_error or not bool(out.isnan().cpu()[bad].all()):
                            problems.append(f"functional API, {api[-1]}")
                    except ValueError as exc:
                        api.append(f"debug={dbg}: ValueError {exc}")
                        if device.type == "cuda" and not dbg:
                            problems.append(f"functional API on CUDA raised (expected NaN poison): {exc}")
                        elif "labels" not in str(exc):
                            problems.append(f"the error does not name labels: {exc}")
                    finally:
                        debug.enable(False)
            if problems:
                return "fail", "; ".join(problems), {"functional": api}
            return "pass", "op: NaN on the bad rows only; " + "; ".join(api), {}

        ck.run(f"edge/labels-out-of-range/{b}", bad_labels)


def odd_shape_ops(device: torch.device) -> list[str]:
    """Every native op, forward and backward, on tiny odd shapes, against the reference (fp32) -- the coupling also
    on chunk views and a joint s/t tensor (the strided reads and the one-buffer s/t gradient). Run in-process, and
    as the child under compute-sanitizer on CUDA. Returns the problems found."""
    problems = []
    g = torch.Generator().manual_seed(13)
    shape = (3, 5, 7, 7)

    def compare(label, fn):
        outs = {}
        for name in ("torch", "native"):
            gen = torch.Generator().manual_seed(14)
            leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in tensors]
            with ff.use_backend(name):
                res = fn(*leaves)
            res = res if isinstance(res, tuple) else (res,)
            loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
                       for o in res)
            grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad], allow_unused=True)
            outs[name] = [o.detach().cpu() for o in res] + [gr.cpu() for gr in grads if gr is not None]
        for a, r in zip(outs["native"], outs["torch"]):
            if not torch.allclose(a.double(), r.double(), rtol=1e-4, atol=1e-4):
                problems.append(f"{label}: differs from the reference by {float((a.double() - r.double()).abs().max())}")

    def rnd(*s, kind="randn"):
        return (torch.randn if kind == "randn" else torch.rand)(*s, generator=g).to(device)

    x, s, t, sc, sl = rnd(*shape), rnd(*shape), rnd(*shape), rnd(shape[1], kind="rand") + 0.5, rnd(shape[0])
    mask = (rnd(*shape[1:], kind="rand") > 0.5).float()
    for rev in (False, True):
        tensors = [x, s, t, sc, sl]
        compare(f"coupling checkerboard reverse={rev}",
                lambda x, s, t, sc, sl, rev=rev: F.affine_coupling(x, s, t, sc, F.checkerboard(1), rev, sl))
        compare(f"coupling tensor mask reverse={rev}",
                lambda x, s, t, sc, sl, rev=rev: F.affine_coupling(x, s, t, sc, mask, rev, sl))
        tensors = [x.reshape(3, -1)[:, :37], s.reshape(3, -1)[:, :37], t.reshape(3, -1)[:, :37]]
        compare(f"vector coupling reverse={rev}", lambda x, s, t, rev=rev: F.affine_coupling(x, s, t, None, None, rev))
        # the layouts AffineCoupling hands the kernels: chunk views (batch-strided, read in place) and the s/t net's
        # output whole (t=None; its gradient written as one tensor)
        tensors = [torch.cat([x, x], 1), torch.cat([s, t], 1), sc, sl]
        compare(f"coupling chunk views reverse={rev}",
                lambda xw, st, sc, sl, rev=rev: F.affine_coupling(xw.chunk(2, 1)[1], *st.chunk(2, 1), sc,
                                                                  F.checkerboard(0), rev, sl))
        compare(f"coupling joint s/t reverse={rev}",
                lambda xw, st, sc, sl, rev=rev: F.affine_coupling(xw.chunk(2, 1)[1], st, None, sc, mask, rev, sl))
    tensors = [rnd(*shape, kind="rand"), rnd(*shape, kind="rand"), sl]
    compare("logit", lambda x, n, sl: F.logit_transform(x, 0.05, False, sl, noise=n))
    tensors = [x]
    compare("logit reverse", lambda x: F.logit_transform(x, 0.05, True))
    for alt in (False, True):
        tensors = [rnd(3, 5, 6, 8)]
        compare(f"squeeze alt_order={alt}", lambda x, alt=alt: F.squeeze2x2(x, False, alt))
        tensors = [rnd(3, 20, 3, 5)]
        compare(f"unsqueeze alt_order={alt}", lambda x, alt=alt: F.squeeze2x2(x, True, alt))
    labels = torch.tensor([-1, 4, 0], device=device)
    for diag in (False, True):
        tensors = [rnd(3, 245), rnd(5, 245), 0.1 * rnd(*((5, 245) if diag else (5,))), rnd(5)]
        compare(f"gmm diag={diag}", lambda z, m, ls, w: F.gmm_nll(z, m, ls, w, labels=labels, label_weight=2.0,
                                                                  return_logits=True))
    return problems


def sanitizer_checks(ck: Checker, device: torch.device) -> None:
    native = fast_backends(device)["native"]

    def in_process():
        if native is not None:
            raise Skip(native)
        problems = odd_shape_ops(device)
        if problems:
            return "fail", "; ".join(problems), {}
        return "pass", "native ops on (3, 5, 7, 7) and friends match the reference, forward and backward", {}

    ck.run("edge/native-odd-shapes", in_process)

    def memcheck():
        if native is not None:
            raise Skip(native)
        if device.type != "cuda":
            raise Skip(f"no CUDA device (device {device.type}): compute-sanitizer checks CUDA kernels only")
        exe = shutil.which("compute-sanitizer")
        if exe is None:
            raise Skip("no compute-sanitizer on PATH")
        left = min(150.0, max(30.0, ck.deadline - time.monotonic()))
        cmd = [exe, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-m", "benchmarks.gpu_check",
               "--sanitizer-child"]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=left,
                                  cwd=Path(__file__).resolve().parent.parent)
        except subprocess.TimeoutExpired:
            return "fail", f"compute-sanitizer did not finish within {left:.0f} s", {}
        tail = (proc.stdout + proc.stderr)[-3000:]
        clean = "ERROR SUMMARY: 0 errors" in tail and "child ok" in proc.stdout
        if proc.returncode == 0 and clean:
            return "pass", "memcheck: 0 errors over the native ops on odd shapes", {}
        return "fail", f"memcheck exited {proc.returncode}", {"tail": tail}

    ck.run("edge/compute-sanitizer", memcheck)


# ------------------------------------------------------------------------------------------------ training steps

def _train_models(device: torch.device, dry: bool):
    """Small FlowGMMs (no dropout, no dequantisation noise: a deterministic step), same weights for every backend."""
    from flowgmm_fast.nn import GaussianMixture, RealNVP, RealNVPTabular

    torch.manual_seed(0)
    # s/t nets without residual blocks: a third less to trace and compile (compiling dominates these checks), the
    # same code paths (both scales, checkerboard and channel couplings, squeezes, logit, the fused prior)
    c, hw, mid, blocks, batch = (1, 4, 4, 0, 4) if dry else (3, 8, 8, 0, 32)
    image = ff.FlowGMM(RealNVP(c, 2, mid, blocks, dequantize=False), GaussianMixture(3, c * hw * hw))
    dim = 6 if dry else 64
    tab = ff.FlowGMM(RealNVPTabular(dim, 2, 8 if dry else 128, dropout=0.0),
                     GaussianMixture(3, dim, weights_trainable=True))
    g = torch.Generator().manual_seed(0)
    xi = torch.rand(batch, c, hw, hw, generator=g)
    xt = torch.randn(batch, dim, generator=g)
    labels = torch.randint(0, 3, (batch,), generator=g)
    labels[::2] = -1
    return {"realnvp": (image.to(device), xi.to(device), labels.to(device)),
            "tabular": (tab.to(device), xt.to(device), labels.to(device))}


def _loss_and_grads(model, x, labels, fn=None):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = (fn or (lambda x, y: model(x, y, 2.0).nll.mean()))(x, labels)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


def _close(a, b, rtol, atol) -> float | None:
    """None when every pair is close, else the largest difference."""
    worst = 0.0
    bad = False
    for u, v in zip(a, b):
        if not torch.allclose(u, v, rtol=rtol, atol=atol, equal_nan=False):
            bad = True
        worst = max(worst, float((u.double() - v.double()).abs().max()))
    return worst if bad else None


def train_checks(ck: Checker, device: torch.device, dry: bool) -> None:
    avail = fast_backends(device)
    models = None
    for mname in ("realnvp", "tabular"):
        for b in ("torch",) + FAST:
            names = [f"train/{mname}/{b}/{v}" for v in ("compile", "cudagraph", "repeat")]
            if any(ck.wanted(n) for n in names):
                models = models or _train_models(device, dry)
                train_backend(ck, device, mname, b, None if b == "torch" else avail[b], *models[mname])


def train_backend(ck: Checker, device: torch.device, mname: str, b: str, reason: str | None, model0, x, labels):
    def compile_check():
        if reason is not None:
            raise Skip(reason)
        model = copy.deepcopy(model0)
        compiler = "inductor" if device.type == "cuda" else "aot_eager"
        with ff.use_backend(b):
            eager = _loss_and_grads(model, x, labels)
            torch._dynamo.reset()
            step = torch.compile(lambda x, y: model(x, y, 2.0).nll.mean(), backend=compiler, fullgraph=True)
            comp = _loss_and_grads(model, x, labels, step)
        diff = _close([comp[0]] + comp[1], [eager[0]] + eager[1], 1e-3, 1e-4)
        details = {"loss": float(comp[0]), "eager_loss": float(eager[0]), "compiler": compiler}
        if diff is not None or not math.isfinite(float(comp[0])):
            return "fail", f"compiled step differs from eager by up to {diff}", details
        return "pass", f"fullgraph {compiler}: loss {float(comp[0]):.6g} = eager, gradients close", details

    def graph_check():
        if reason is not None:
            raise Skip(reason)
        if device.type != "cuda":
            raise Skip(f"CUDA graphs need a CUDA device (device {device.type})")
        return cuda_graph_step(model0, x, labels, b)

    def repeat_check():
        if reason is not None:
            raise Skip(reason)
        runs = []
        for _ in range(2):
            model = copy.deepcopy(model0)
            with ff.use_backend(b):
                runs.append(_loss_and_grads(model, x, labels))
        loss_same = torch.equal(runs[0][0], runs[1][0])
        n = sum(not torch.equal(u, v) for u, v in zip(runs[0][1], runs[1][1]))
        if not loss_same or n:
            return "fail", f"two identical steps differ: loss equal {loss_same}, {n} of {len(runs[0][1])} gradients", {}
        return "pass", f"loss and {len(runs[0][1])} gradients bit-identical over two steps", {}

    ck.run(f"train/{mname}/{b}/compile", compile_check)
    ck.run(f"train/{mname}/{b}/cudagraph", graph_check)
    ck.run(f"train/{mname}/{b}/repeat", repeat_check)


def cuda_graph_step(model0, x, labels, backend: str):
    """The whole step (forward, backward, clip, SGD) captured in a CUDA graph (PyTorch's recipe: warm up on a side
    stream, capture), the weights then put back in place, one replay: its loss and updated weights against one eager
    step from the same weights."""
    model = copy.deepcopy(model0)
    ref = copy.deepcopy(model0)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(params, lr=1e-3)
    ref_opt = torch.optim.SGD(ref_params, lr=1e-3)

    def step(m, ps, o):
        o.zero_grad(set_to_none=False)
        loss = m(x, labels, 2.0).nll.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ps, 100.0)
        o.step()
        return loss

    with ff.use_backend(backend):
        ref_loss = step(ref, ref_params, ref_opt).detach()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(model, params, opt)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(model, params, opt)
        with torch.no_grad():  # in place: the graph holds these addresses
            for name, v in model.state_dict().items():
                v.copy_(start[name])
        graph.replay()
        torch.cuda.synchronize()
    diff = _close([static_loss.detach()] + [p.detach() for p in params],
                  [ref_loss] + [p.detach() for p in ref_params], 1e-4, 1e-5)
    details = {"replay_loss": float(static_loss), "eager_loss": float(ref_loss),
               "bitwise": bool(torch.equal(static_loss.detach(), ref_loss))}
    if diff is not None or not math.isfinite(float(static_loss)):
        return "fail", f"replayed step differs from eager by up to {diff}", details
    return "pass", f"replay loss {float(static_loss):.6g} = eager {float(ref_loss):.6g}; weights after the step agree", \
        details


# ------------------------------------------------------------------------------------------------ main

def sanitizer_child() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problems = odd_shape_ops(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    for p in problems:
        print("problem:", p)
    print("child ok" if not problems else "child found problems")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="folder for the results file (default benchmarks/results/gpu_run)")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same checks on the CPU at tiny shapes")
    p.add_argument("--only", default=None, help="comma-separated substrings: run only the checks whose names hold one")
    p.add_argument("--deadline-s", type=float, default=None, help="skip the checks not started within this time")
    p.add_argument("--sanitizer-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inject-fault", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a wrong "kernel"
    args = p.parse_args(argv)
    if args.sanitizer_child:
        return sanitizer_child()
    if args.cpu_dry_run:
        device = torch.device("cpu")
        # tiny shapes: one thread (on a loaded 2-core machine two OpenMP threads made a 4x4 RealNVP step 100x slower)
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_check: no CUDA device; use --cpu-dry-run to run the checks on the CPU at tiny shapes",
              file=sys.stderr)
        return 2
    # fp32 means fp32: no TF32 in PyTorch's matmuls or cuDNN's convolutions (the s/t net of the module case), on the
    # kernels' side and the reference's alike
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.monotonic()
    meta = common.run_metadata(device, argv=None if argv is None else ["benchmarks.gpu_check", *argv])
    meta["mode"] = "cpu-dry-run" if args.cpu_dry_run else "gpu"
    meta["fast_backends"] = fast_backends(device)
    meta["tf32"] = False
    out_dir = Path(args.out) if args.out else common.RESULTS_DIR / "gpu_run"
    deadline = t0 + args.deadline_s if args.deadline_s else math.inf
    ck = Checker(out_dir, meta, deadline, [s for s in args.only.split(",") if s] if args.only else None)
    print(f"gpu_check: {meta['mode']} on {meta['device']}; fast backends: "
          f"{ {b: r or 'ok' for b, r in meta['fast_backends'].items()} }", flush=True)
    parity_checks(ck, device, args.cpu_dry_run, args.inject_fault)
    edge_checks(ck, device)
    train_checks(ck, device, args.cpu_dry_run)
    sanitizer_checks(ck, device)
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    ck.write()
    s = ck.summary()
    print(f"gpu_check: {s['pass']} passed, {s['fail']} failed, {s['skip']} skipped in {meta['wall_s']} s; "
          f"wrote {ck.path}")
    for name in s["failed"]:
        print(f"  FAILED {name}")
    return 1 if s["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
