"""Backprop by inversion (RevNet, Gomez et al. 2017): training memory that does not grow with the flow's depth.

Standard autograd keeps what every layer saves until the backward pass -- for RealNVP the activations of every s/t
ResNet. In this mode the layers of a flow run under ``no_grad`` in the forward pass and keep nothing; the backward
pass walks them from the last to the first, rebuilds each layer's input from its output with the layer's inverse,
recomputes that one layer with grad, back-propagates through it and frees it. Peak memory is one layer's
activations plus the chain's input and output, whatever the depth.

Use it through the models -- ``RealNVP(..., invertible_backprop=True)``, ``RealNVPTabular(...,
invertible_backprop=True)``, ``FlowSequential(*layers, invertible_backprop=True)`` for a flow of your own -- or call
:func:`invertible_forward` on any flow. ``checkpoint_every=N`` also keeps the exact input of every N-th layer (see
"Drift" below).

What each part needs, and how it is done here:

- **affine coupling** (:class:`CouplingStep`): the s/t net reads only the positions the coupling keeps, and the
  output equals the input there bit for bit, so the backward pass computes (s, t) ONCE, from the output, with grad:
  the same (s, t) inverts the coupling and is differentiated. Cost: forward + (s/t forward + backward) = about 4/3
  of a standard step's work, instead of 5/3 for "invert, then recompute".
- **batch-norm in training mode**: the recomputation sees bit-identical s/t inputs, so it normalises with the same
  batch statistics; its running statistics are frozen while the backward pass recomputes, so they are updated once
  per step, by the forward pass, exactly as in standard mode.
- **dropout, dequantisation noise**: the CPU (and CUDA) RNG state before each layer's forward is saved and replayed
  for its recomputation, so masks and noise are the same; the global RNG state is restored afterwards.
- **Logit with dequantisation noise in training** cannot be inverted to its input (the inverse gives the
  dequantised value), so its input is kept -- it is the chain's input, the data batch, held by the caller anyway.
  The first layer's input is always kept.
- **squeeze, multi-scale factor-out**: permutations, inverted exactly; a factored-out half is carried on a stack
  from :class:`FactorOutStep` to :class:`MergeStep` and back in the backward pass.
- **log-det**: each layer's log-det is recomputed with its layer; the gradient of the running sum passes through.
- **autocast, backend**: the autocast state and the backend in force at the forward pass are re-entered in the
  backward pass, so the recomputation runs the same kernels in the same dtypes.
- **DDP**: every layer is one autograd node with its parameters as inputs, so DDP's hooks fire per layer as the
  backward pass reaches it (gradient all-reduce overlaps the rest of the backward pass).
- **torch.compile**: the chain runs eagerly (``torch.compiler.disable``): a compiled model graph-breaks around the
  flow and compiles the rest (prior, loss); ``fullgraph=True`` refuses it with the reason below.
- **double backward** (``create_graph=True``) is not supported and raises.

Drift: x is rebuilt from y with floating-point error, and the next layer down inverts from that rebuilt value, so
the error of the rebuilt inputs grows with depth (measured in ``benchmarks/bench_invertible.py``). ``checkpoint_every
= N`` keeps the exact input of every N-th parametric layer, which bounds the error to N layers' worth at the cost of
one stored activation per N layers. :class:`DriftProbe` measures it for a model of your own.

Assumptions: every layer's inverse is exact in exact arithmetic (true of the library's layers; a layer of your own
must be a bijection whose ``forward(y, reverse=True)`` inverts ``forward(x)``), and the modules' train/eval mode does
not change between the forward and the backward pass.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _backend
from .. import functional as F
from .base import Flow, FlowSequential, zero_sldj
from .coupling import AffineCoupling
from .layers import Logit, Squeeze

__all__ = ["invertible_forward", "steps_of", "Step", "CouplingStep", "LayerStep", "SqueezeStep", "FactorOutStep",
           "MergeStep", "DriftProbe", "COMPILE_NOTE"]

COMPILE_NOTE = ("invertible_backprop: the flow's layers run eagerly, one autograd node per layer that inverts and "
                "recomputes it in the backward pass; torch.compile graph-breaks around the flow and compiles the rest")


# ----------------------------------------------------------------------------------------------------------- steps
class Step:
    """One node of an invertible chain.

    ``forward(h, sldj, tape) -> (y, sldj)`` runs the layer (the caller has grad disabled);
    ``backward(x, y, gy, gsldj, need_gx, params, replay_rng, tape) -> (x, gx, param_grads)`` gets the layer's
    output y (and its input x when it was kept, else None), rebuilds x when needed and returns it with the gradient
    w.r.t. x (None unless ``need_gx``) and w.r.t. ``params`` (a list, None for unused ones).
    ``module``: the module whose parameters the step uses (None: no parameters, no randomness).
    ``parametric``: counts toward ``checkpoint_every``.
    """

    module: nn.Module | None = None
    parametric = False

    def exact_inverse(self) -> bool:
        """Whether the layer's output determines its input (else its input is kept)."""
        return True

    def forward(self, h, sldj, tape):
        raise NotImplementedError

    def backward(self, x, y, gy, gsldj, need_gx, params, replay_rng, tape):
        raise NotImplementedError


def _vjp(outputs, grads, inputs):
    """autograd.grad of the outputs that require grad w.r.t. the inputs that do; None where there is no gradient."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o is not None and o.requires_grad]
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    result = [None] * len(inputs)
    if not pairs or not wanted:
        return result
    got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                              allow_unused=True)
    for i, g in zip(wanted, got):
        result[i] = g
    return result


def _sum(a, b):
    if a is None:
        return b
    return a if b is None else a + b


class CouplingStep(Step):
    """An :class:`AffineCoupling`: (s, t) computed once in the backward pass, from the output's kept positions."""

    parametric = True

    def __init__(self, layer: AffineCoupling):
        self.module = layer

    def forward(self, h, sldj, tape):
        return self.module(h, sldj)

    def backward(self, x, y, gy, gsldj, need_gx, params, replay_rng, tape):
        layer = self.module
        # conditioning() reads only kept positions, equal in x and y: a leaf of either gives the s/t path's gradient
        src = (x if x is not None else y).detach().requires_grad_(need_gx)
        with torch.enable_grad(), replay_rng():
            st = layer.st_joint(layer.conditioning(src))  # whole: its gradient comes back as one buffer (no cat)
        if x is None:
            with torch.no_grad():
                x, _ = layer.couple(y, st.detach(), None, reverse=True)
        x_leaf = x.detach().requires_grad_(need_gx)
        with torch.enable_grad():
            y2, ldj = layer.couple(x_leaf, st, None)
        grads = _vjp((y2, ldj), (gy, gsldj), [x_leaf, src, *params])
        return x_leaf.detach(), (_sum(grads[0], grads[1]) if need_gx else None), grads[2:]


class LayerStep(Step):
    """Any other :class:`Flow`: inverted with ``forward(y, reverse=True)``, then recomputed with grad."""

    parametric = True

    def __init__(self, layer: Flow):
        self.module = layer

    def exact_inverse(self) -> bool:
        layer = self.module
        return not (isinstance(layer, Logit) and layer.dequantize and layer.training)

    def forward(self, h, sldj, tape):
        return self.module(h, sldj)

    def backward(self, x, y, gy, gsldj, need_gx, params, replay_rng, tape):
        layer = self.module
        if x is None:
            with torch.no_grad(), replay_rng():
                x = layer(y, None, reverse=True)[0]
        x_leaf = x.detach().requires_grad_(need_gx)
        if not need_gx and not params:
            return x_leaf, None, []
        with torch.enable_grad(), replay_rng():
            y2, ldj = layer(x_leaf, None)
        grads = _vjp((y2, ldj), (gy, gsldj), [x_leaf, *params])
        return x_leaf.detach(), grads[0], grads[1:]


class SqueezeStep(Step):
    """The 2x2 squeeze (``reverse``: unsqueeze), a permutation: values and gradients go back through its inverse."""

    def __init__(self, reverse: bool = False, alt_order: bool = False):
        self.reverse, self.alt_order = bool(reverse), bool(alt_order)

    def forward(self, h, sldj, tape):
        return F.squeeze2x2(h, self.reverse, self.alt_order), sldj

    def backward(self, x, y, gy, gsldj, need_gx, params, replay_rng, tape):
        undo = (lambda v: F.squeeze2x2(v.contiguous(), not self.reverse, self.alt_order))
        return (undo(y) if x is None else x), (undo(gy) if need_gx else None), []


class FactorOutStep(Step):
    """RealNVP's factor-out: squeeze in the alternate order, keep the first half of the channels, set the second
    half aside (on the tape's stack) until the matching :class:`MergeStep`."""

    def forward(self, h, sldj, tape):
        h_next, h_out = F.squeeze2x2(h, alt_order=True).chunk(2, dim=1)
        tape.stack.append(h_out)
        return h_next, sldj

    def backward(self, x, y, gy, gsldj, need_gx, params, replay_rng, tape):
        out, g_out = tape.stack.pop()
        if x is None:
            x = F.squeeze2x2(torch.cat((y, out), dim=1), reverse=True, alt_order=True)
        gx = F.squeeze2x2(torch.cat((gy, g_out), dim=1), reverse=True, alt_order=True) if need_gx else None
        return x, gx, []


class MergeStep(Step):
    """Inverse of :class:`FactorOutStep`: concatenate the half set aside and unsqueeze."""

    def forward(self, h, sldj, tape):
        return F.squeeze2x2(torch.cat((h, tape.stack.pop()), dim=1), reverse=True, alt_order=True), sldj

    def backward(self, x, y, gy, gsldj, need_gx, params, replay_rng, tape):
        h, out = F.squeeze2x2(y.contiguous(), alt_order=True).chunk(2, dim=1)
        gh, g_out = F.squeeze2x2(gy.contiguous(), alt_order=True).chunk(2, dim=1)
        tape.stack.append((out, g_out))  # popped by the matching FactorOutStep
        return (h if x is None else x), (gh if need_gx else None), []


def steps_of(flow: nn.Module) -> list[Step]:
    """The flat list of steps of a flow: a module's own ``invertible_steps()`` when it has one (RealNVP), the layers
    of a :class:`FlowSequential` in order, :class:`CouplingStep` / :class:`SqueezeStep` for the library's layers,
    :class:`LayerStep` for any other :class:`Flow`."""
    if hasattr(flow, "invertible_steps"):
        return list(flow.invertible_steps())
    if isinstance(flow, AffineCoupling):
        return [CouplingStep(flow)]
    if isinstance(flow, Squeeze):
        return [SqueezeStep(False, flow.alt_order)]
    if isinstance(flow, FlowSequential):
        return [step for layer in flow.layers for step in steps_of(layer)]
    if isinstance(flow, Flow):
        return [LayerStep(flow)]
    raise TypeError(f"invertible backprop needs flowgmm_fast.nn.Flow layers, got {type(flow).__name__}")


# ------------------------------------------------------------------------------------- forward-time state replayed
def _capture_rng(device: torch.device):
    cpu = torch.get_rng_state()
    dev = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, dev


@contextlib.contextmanager
def _replayed_rng(state, device: torch.device):
    """Run the block from the RNG state saved before the layer's forward; restore the current state afterwards."""
    if state is None:
        yield
        return
    cpu, dev = state
    with torch.random.fork_rng(devices=[device] if dev is not None else [], device_type="cuda"):
        torch.set_rng_state(cpu)
        if dev is not None:
            torch.cuda.set_rng_state(dev, device)
        yield


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module | None):
    """Batch-norms in training mode normalise with the batch statistics but leave their running statistics (and
    num_batches_tracked) alone: the recomputation must not update them a second time."""
    norms = [] if module is None else [m for m in module.modules()
                                       if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class _Tape:
    """State one chain's forward pass leaves for its backward pass: the steps, each step's parameters, which inputs
    are kept, the backend and autocast state, and the hand-over of rebuilt values from a step to its predecessor."""

    def __init__(self, steps: list[Step], params: list[list[torch.Tensor]], keep_input: list[bool],
                 device: torch.device, probe: DriftProbe | None):
        self.steps, self.params, self.keep_input, self.device = steps, params, keep_input, device
        self.backend = _backend.get_backend()
        dt = device.type
        self.autocast = dict(device_type=dt, enabled=torch.is_autocast_enabled(dt),
                             dtype=torch.get_autocast_dtype(dt), cache_enabled=torch.is_autocast_cache_enabled())
        self.rebuilt: dict[int, torch.Tensor] = {}  # step index -> its output, rebuilt by the next step's backward
        self.stack: list = []                       # factored-out halves (forward), (value, grad) pairs (backward)
        self.probe = probe

    @contextlib.contextmanager
    def replay(self):
        """The backend and autocast state of the forward pass (the backward pass runs outside both)."""
        with _backend.use_backend(self.backend), torch.autocast(**self.autocast):
            yield


def _own(out: torch.Tensor, inp: torch.Tensor | None) -> torch.Tensor:
    """A step's output must not alias its input (autograd would treat it as a view of the input)."""
    if inp is not None and out.untyped_storage().data_ptr() == inp.untyped_storage().data_ptr():
        return out.clone()
    return out


class _StepFunction(torch.autograd.Function):
    """One step of a chain as one autograd node: (h, sldj, *params) -> (y, sldj). Saves nothing but its input when
    the tape says to keep it, and its output when it is the chain's last step."""

    @staticmethod
    def forward(ctx, tape: _Tape, i: int, h, sldj, *params):
        step = tape.steps[i]
        ctx.rng = _capture_rng(h.device) if step.module is not None else None
        if tape.probe is not None:
            tape.probe._forward_input(i, step, h)
        y, sldj_out = step.forward(h, sldj, tape)
        y, sldj_out = _own(y, h), _own(sldj_out, sldj)
        ctx.tape, ctx.i = tape, i
        ctx.save_for_backward(h if tape.keep_input[i] else None, y if i == len(tape.steps) - 1 else None)
        return y, sldj_out

    @staticmethod
    def backward(ctx, gy, gsldj):
        if torch.is_grad_enabled():
            raise RuntimeError("invertible_backprop does not support double backward (create_graph=True); use the "
                               "standard mode (invertible_backprop=False) for higher-order gradients")
        tape, i = ctx.tape, ctx.i
        step = tape.steps[i]
        x_kept, y = ctx.saved_tensors
        if y is None:
            if i not in tape.rebuilt:
                raise RuntimeError(f"invertible_backprop: the output of step {i} ({type(step).__name__}) was not "
                                   "rebuilt; was the backward pass asked for only part of the flow's gradients?")
            y = tape.rebuilt.pop(i)
        need_gx = ctx.needs_input_grad[2]
        rng, device = ctx.rng, y.device
        with tape.replay(), _running_stats_frozen(step.module):
            x, gx, param_grads = step.backward(x_kept, y, gy, gsldj, need_gx, tape.params[i],
                                               lambda: _replayed_rng(rng, device), tape)
        if need_gx and i > 0:
            tape.rebuilt[i - 1] = x
        if tape.probe is not None and x_kept is None:
            tape.probe._rebuilt_input(i, x)
        return (None, None, gx, gsldj if ctx.needs_input_grad[3] else None, *param_grads)


def _keep_inputs(steps: list[Step], checkpoint_every: int | None) -> list[bool]:
    keep, n = [], 0
    for i, step in enumerate(steps):
        every = step.parametric and checkpoint_every is not None and n % checkpoint_every == 0
        keep.append(i == 0 or not step.exact_inverse() or every)
        n += step.parametric
    return keep


def _run(steps: list[Step], x: torch.Tensor, sldj: torch.Tensor | None, checkpoint_every: int | None):
    """The chain behind ``torch.compiler.disable``, the wrapper made on first use: the decorator imports torch._dynamo
    (~1.5 s), which ``import flowgmm_fast`` must not do (tests/test_benchmarks.py checks the import)."""
    global _run_disabled
    if _run_disabled is None:
        _run_disabled = torch.compiler.disable(_run_eager, reason=COMPILE_NOTE)
    return _run_disabled(steps, x, sldj, checkpoint_every)


# What torch.compiler.disable marks on a function, set by hand: dynamo refuses to inline _run and gives the reason
# (a graph break; ``fullgraph=True`` raises with COMPILE_NOTE), also before the wrapper above exists.
_run._torchdynamo_disable = True
_run._torchdynamo_disable_msg = COMPILE_NOTE
_run_disabled = None


def _run_eager(steps: list[Step], x: torch.Tensor, sldj: torch.Tensor | None, checkpoint_every: int | None):
    sldj = zero_sldj(x, sldj)
    params = [[] if s.module is None else [p for p in s.module.parameters() if p.requires_grad] for s in steps]
    tape = _Tape(steps, params, _keep_inputs(steps, checkpoint_every), x.device, DriftProbe._active())
    for i in range(len(steps)):
        x, sldj = _StepFunction.apply(tape, i, x, sldj, *params[i])
    return x, sldj


def check_checkpoint_every(value) -> int | None:
    """Validate a ``checkpoint_every`` argument: None or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"checkpoint_every must be None or an int >= 1, got {value!r}")
    return value


def invertible_forward(flow: nn.Module | Sequence[nn.Module], x: torch.Tensor, sldj: torch.Tensor | None = None,
                       *, checkpoint_every: int | None = None):
    """``flow(x, sldj)`` with backprop by inversion: ``(z, sldj)``, equal to the standard forward pass; the backward
    pass rebuilds each layer's input from its output instead of keeping it (module docstring).

    flow: a :class:`Flow` (e.g. a :class:`FlowSequential` of :class:`AffineCoupling` layers) or a sequence of Flow
    layers applied in order. checkpoint_every: also keep the exact input of every N-th parametric layer (bounds the
    drift of the rebuilt inputs; None: only the first layer's input). Without grad enabled this is the plain forward.
    """
    checkpoint_every = check_checkpoint_every(checkpoint_every)
    if isinstance(flow, nn.Module):
        steps = steps_of(flow)
    else:
        steps = [step for layer in flow for step in steps_of(layer)]
    if not steps:
        raise ValueError("invertible_forward: the flow has no layers")
    if not torch.is_grad_enabled():
        sldj = zero_sldj(x, sldj)
        tape = _Tape(steps, [], [], x.device, None)
        for step in steps:
            x, sldj = step.forward(x, sldj, tape)
        return x, sldj
    return _run(steps, x, sldj, checkpoint_every)


# --------------------------------------------------------------------------------------------------------- drift
class DriftProbe:
    """Measures the drift of the rebuilt inputs: inside ``with DriftProbe() as probe:``, each invertible chain's
    forward pass records every step's input and its backward pass records the input it rebuilt. Costs one copy of
    every activation while active -- a diagnostic, not for training.

    ``probe.errors()``: one dict per rebuilt input: step index, step kind, max |rebuilt - forward|, and that over
    max |forward| (``rel``)."""

    _local = threading.local()

    def __init__(self):
        self.inputs: dict[int, torch.Tensor] = {}
        self.rebuilt: dict[int, torch.Tensor] = {}
        self.kinds: dict[int, str] = {}

    @classmethod
    def _active(cls) -> DriftProbe | None:
        return getattr(cls._local, "probe", None)

    def __enter__(self) -> DriftProbe:
        if self._active() is not None:
            raise RuntimeError("DriftProbe: another probe is already active in this thread")
        DriftProbe._local.probe = self
        return self

    def __exit__(self, *exc):
        DriftProbe._local.probe = None
        return False

    def _forward_input(self, i: int, step: Step, h: torch.Tensor) -> None:
        self.inputs[i] = h.detach().clone()
        self.kinds[i] = type(step.module if step.module is not None else step).__name__

    def _rebuilt_input(self, i: int, x: torch.Tensor) -> None:
        self.rebuilt[i] = x.detach().clone()

    def errors(self) -> list[dict]:
        out = []
        for i in sorted(self.rebuilt):
            ref, got = self.inputs[i].double(), self.rebuilt[i].double()
            err = (got - ref).abs().max().item()
            rel = err / max(ref.abs().max().item(), 1e-300)
            out.append({"step": i, "kind": self.kinds[i], "max_abs": err, "rel": rel})
        return out


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_options(invertible_backprop, checkpoint_every) -> tuple[bool, int | None]:
    """Validate the models' ``invertible_backprop`` / ``checkpoint_every`` keyword arguments."""
    return _check_flag("invertible_backprop", invertible_backprop), check_checkpoint_every(checkpoint_every)

