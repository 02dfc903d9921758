"""What a resumed run may change: the command-line policy of the training scripts, and applying a new learning rate.

A checkpoint stores the script's arguments. When a run is resumed, each argument falls in one of three kinds:

- **fixed** (the model, the data, the split, the seed, the batch, ...): they define the state being resumed. Given on
  the command line with a different value they are an error naming the argument; not given, they take the saved
  value, so ``--resume`` needs only the flags that say where the run lives.
- **mutable** hyperparameters (learning rates, gradient clipping, loss weights, the length of the run, intervals):
  given explicitly, the new value is used and the change is logged -- e.g. a lower ``--lr`` to rescue a diverging run
  (the optimizers and schedulers restored from the checkpoint are updated with :func:`set_learning_rate`); not given,
  the saved value is kept.
- **environment** (device, backend, folders, worker threads, progress output): always from the command line.

"Given" means present in ``argv`` (:func:`explicit_dests`), not equal to the default: resuming with a shorter command
line never silently resets a saved value to a default.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

__all__ = ["explicit_dests", "reconcile_resume_args", "Change", "set_learning_rate", "ResumeArgumentError"]


class ResumeArgumentError(ValueError):
    """A resumed run was asked to change an argument that defines the saved state."""


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The ``dest`` names of the options given in ``argv`` (None: ``sys.argv[1:]``), whatever their values."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:  # the same options, with defaults suppressed: only given ones land in the result
        if isinstance(action, argparse._HelpAction):
            continue
        kwargs = dict(dest=action.dest, default=argparse.SUPPRESS, required=False)
        if action.option_strings:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
                kwargs.update(action="store_const", const=action.const)
            else:
                kwargs.update(nargs=action.nargs)
            probe.add_argument(*action.option_strings, **kwargs)
        else:
            probe.add_argument(action.dest, nargs="?" if action.nargs is None else action.nargs,
                               default=argparse.SUPPRESS)
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


class Change(NamedTuple):
    """A mutable argument a resumed run changes: its ``dest``, its ``flag`` as typed, the saved and the new value."""

    dest: str
    flag: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.flag} {self.old!r} -> {self.new!r}"


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def reconcile_resume_args(args: argparse.Namespace, saved: Mapping | None, parser: argparse.ArgumentParser,
                          argv: Sequence[str] | None, *, mutable: Iterable[str],
                          environment: Iterable[str]) -> dict[str, Change]:
    """Apply the resume policy of the module docstring to ``args`` (parsed by ``parser`` from ``argv``) in place,
    against the ``saved`` arguments of the checkpoint; returns the mutable arguments changed, by dest (to apply and
    log).

    Raises :class:`ResumeArgumentError` naming every fixed argument given with a value other than the saved one.
    Arguments the checkpoint does not know (added since) keep the command line's value.
    """
    if not saved:
        return {}
    given, flags = explicit_dests(parser, argv), _flags(parser)
    mutable, environment = set(mutable), set(environment)
    conflicts, changes = [], {}
    for name, new in vars(args).items():
        if name in environment or name not in saved:
            continue
        old = saved[name]
        if name not in given:
            setattr(args, name, old)
        elif new != old:
            flag = flags.get(name, name)
            if name in mutable:
                changes[name] = Change(name, flag, old, new)
            else:
                conflicts.append(f"{flag} (checkpoint {old!r}, command line {new!r})")
    if conflicts:
        allowed = ", ".join(sorted(flags.get(n, n) for n in mutable))
        raise ResumeArgumentError(
            "a resumed run cannot change the arguments that define its saved state: " + "; ".join(conflicts)
            + f". A resume may change {allowed}; start a new run (another checkpoint folder) to change the others")
    return changes


def set_learning_rate(optimizer: torch.optim.Optimizer, scheduler, lr: float) -> None:
    """Make ``lr`` the base learning rate of every parameter group of ``optimizer`` (restored from a checkpoint),
    keeping the schedule's current factor: the group's lr is scaled by lr / old base, and the scheduler's
    ``base_lrs`` (and the groups' ``initial_lr``) become ``lr``, so the schedule continues from the new base."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    bases = list(getattr(scheduler, "base_lrs", [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]))
    for i, group in enumerate(optimizer.param_groups):
        old = bases[i] if i < len(bases) else group["lr"]
        group["lr"] = group["lr"] * (lr / old) if old else lr
        if "initial_lr" in group:
            group["initial_lr"] = lr
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
