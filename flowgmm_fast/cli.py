"""``flowgmm-fast``: fit a FlowGMMClassifier on a table and predict with it, from the shell.

    flowgmm-fast fit data.csv --label-column y --out model/         # an empty label cell = unlabeled row
    flowgmm-fast fit data.npz --out model/                           # arrays X (or x) and y, -1 = unlabeled
    flowgmm-fast predict model/ new.csv --out predictions.csv        # class and class probabilities per row

CSV: comma-separated, a header line naming the columns (or none: columns are then numbered from 0); every column but
the label column is a numeric feature (a missing or non-numeric feature is an error naming its row and column).
Labels may be any text or numbers; if every label parses as an integer, the classes are integers. ``predict`` reads
the columns the model was trained on by name when both files have headers (a label column there is ignored).
``fit`` writes the model folder (``FlowGMMClassifier.save``: config.json + weights.safetensors, no pickle) and
``summary.json``; without ``--out`` it makes a new folder ``runs/flowgmm-<UTC time>-<random>`` that no other run
can share, and it never writes into a non-empty folder that is not a saved model unless ``--overwrite``.
Estimator parameters: ``--param name=value`` (repeatable), e.g. ``--param n_estimators=3``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np

from .data._files import open_npz

__all__ = ["main", "read_table"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_table(path: str, label_column: str | None = None):
    """(X float64 (N, D), y object array or None, feature names or None) from a .csv or .npz file.

    CSV: ``label_column`` (a header name or a 0-based index) holds the labels, "" = unlabeled. NPZ: arrays ``X`` /
    ``x`` and optionally ``y`` (-1 = unlabeled) and ``feature_names``."""
    if not os.path.isfile(path):
        raise CLIError(f"data file not found: {path}")
    if path.endswith(".npz"):
        with open_npz(path, "data file", CLIError) as f:
            xk = next((k for k in ("X", "x", "features") if k in f.files), None)
            if xk is None:
                raise CLIError(f"{path}: needs an array 'X' (or 'x'); found {sorted(f.files)}")
            x = np.asarray(f[xk], np.float64)
            y = np.asarray(f["y"]) if "y" in f.files else None
            names = [str(n) for n in f["feature_names"]] if "feature_names" in f.files else None
        if x.ndim != 2:
            raise CLIError(f"{path}: {xk} must be 2-D, got shape {x.shape}")
        if y is not None and y.shape != (x.shape[0],):
            raise CLIError(f"{path}: y must have one entry per row of {xk} ({x.shape[0]}), got shape {y.shape}")
        return x, y, names
    if not path.endswith(".csv"):
        raise CLIError(f"data file must end in .csv or .npz, got {path}")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise CLIError(f"{path} is empty")
    first = [c.strip() for c in rows[0]]
    header = first if any(c and not _is_number(c) for c in first) else None
    body = rows[1:] if header is not None else rows
    width = len(rows[0])
    names = header if header is not None else [str(i) for i in range(width)]
    col = None
    if label_column is not None:
        if label_column in names:
            col = names.index(label_column)
        elif label_column.lstrip("-").isdigit() and -width <= int(label_column) < width:
            col = int(label_column) % width
        else:
            raise CLIError(f"--label-column {label_column!r} is not a column of {path} (columns: {names})")
    feat_cols = [j for j in range(width) if j != col]
    x = np.empty((len(body), len(feat_cols)))
    y = np.empty(len(body), dtype=object) if col is not None else None
    for i, row in enumerate(body):
        line = i + (2 if header is not None else 1)
        if len(row) != width:
            raise CLIError(f"{path} line {line}: {len(row)} fields, expected {width}")
        for k, j in enumerate(feat_cols):
            cell = row[j].strip()
            try:
                x[i, k] = float(cell)
            except ValueError:
                raise CLIError(f"{path} line {line}, column {names[j]!r}: feature value {cell!r} is not a number"
                               + (" (missing values are not supported)" if cell == "" else "")) from None
        if col is not None:
            y[i] = row[col].strip()
    return x, y, [names[j] for j in feat_cols] if header is not None else None


def _labels(y: np.ndarray) -> np.ndarray:
    """CSV label strings -> int array (if all labeled cells are integers) or str array; "" -> -1 / ""."""
    cells = [str(v).strip() for v in y]
    labeled = [c for c in cells if c not in ("", "-1")]
    if labeled and all(c.lstrip("-").isdigit() for c in labeled):
        return np.asarray([int(c) if c not in ("",) else -1 for c in cells], np.int64)
    return np.asarray(["" if c == "-1" else c for c in cells], dtype=str)


def _param(text: str):
    if "=" not in text:
        raise CLIError(f"--param needs name=value, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def _new_run_dir() -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path("runs") / f"flowgmm-{stamp}-{secrets.token_hex(3)}"


def cmd_fit(args) -> int:
    from .estimator import FlowGMMClassifier, unlabeled_mask

    x, y, names = read_table(args.data, args.label_column)
    if y is None:
        raise CLIError(f"{args.data} has no labels: give --label-column (CSV) or an array 'y' (npz)")
    y = _labels(y) if y.dtype == object else y
    out = Path(args.out) if args.out else _new_run_dir()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists())):
        raise CLIError(f"--out {str(out)!r} exists and is not an empty folder or a saved model")
    if (out / "config.json").exists() and not args.overwrite:
        raise CLIError(f"--out {str(out)!r} already holds a model: pass --overwrite to replace it")
    params = dict(_param(p) for p in args.param)
    params.setdefault("verbose", not args.no_progress)
    if args.random_state is not None:
        params["random_state"] = args.random_state
    try:
        clf = FlowGMMClassifier(**params)
    except TypeError as exc:
        raise CLIError(f"--param: {exc}") from None
    unl = unlabeled_mask(y)
    t0 = time.perf_counter()
    clf.fit(_frame(x, names), y)
    wall = time.perf_counter() - t0
    clf.save(out)
    pred = clf.predict(_frame(x, names))
    counts = {str(c): int(n) for c, n in zip(*np.unique(y[~unl], return_counts=True))}
    summary = {"data": os.path.abspath(args.data), "rows": int(x.shape[0]), "features": int(x.shape[1]),
               "labeled_rows": counts, "unlabeled_rows": int(unl.sum()), "classes": [str(c) for c in clf.classes_],
               "class_prior": {str(c): round(float(p), 4) for c, p in zip(clf.classes_, clf.class_prior_)},
               "training_rows_predicted": {str(c): int((pred == c).sum()) for c in clf.classes_},
               "labeled_rows_correct": float(np.mean(pred[~unl] == y[~unl])), "fit_seconds": round(wall, 2),
               "steps_per_member": clf.n_iter_, "model": str(out), "feature_columns": names,
               "label_column": args.label_column}
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"fitted on {summary['rows']} rows x {summary['features']} features ({sum(counts.values())} labeled, "
          f"{summary['unlabeled_rows']} unlabeled) in {wall:.1f} s; classes {summary['classes']}")
    print("learned class priors: " + ", ".join(f"{c} {p:.3f}" for c, p in summary["class_prior"].items()))
    print(f"labeled rows predicted correctly: {100 * summary['labeled_rows_correct']:.1f}%")
    print(f"model written to {out}")
    return 0


def _frame(x: np.ndarray, names):
    """x as a DataFrame with column names when pandas is available (so the model keeps feature names)."""
    if names is None:
        return x
    try:
        import pandas as pd
    except ImportError:
        return x
    return pd.DataFrame(x, columns=names)


def cmd_predict(args) -> int:
    from .estimator import FlowGMMClassifier

    try:
        clf = FlowGMMClassifier.load(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    x, _, names = read_table(args.data, args.label_column)
    trained = getattr(clf, "feature_names_in_", None)
    summary = Path(args.model) / "summary.json"
    if trained is None and summary.is_file():  # the CLI records the training columns beside the model
        trained = json.loads(summary.read_text()).get("feature_columns")
    if trained is not None and names is not None:
        missing = [n for n in trained if n not in names]
        if missing:
            raise CLIError(f"{args.data} lacks the feature columns {missing} the model was trained on")
        x = x[:, [names.index(n) for n in trained]]
        names = list(trained)
    elif x.shape[1] != clf.n_features_in_:
        raise CLIError(f"{args.data} has {x.shape[1]} feature columns, the model was trained on {clf.n_features_in_}")
    proba = clf.predict_proba(_frame(x, names) if hasattr(clf, "feature_names_in_") else x)
    pred = clf.classes_[proba.argmax(1)]
    header = ["prediction"] + [f"proba_{c}" for c in clf.classes_]
    stream = sys.stdout if args.out in (None, "-") else open(args.out, "w", newline="")
    try:
        w = csv.writer(stream)
        w.writerow(header)
        for p, row in zip(pred, proba):
            w.writerow([p] + [f"{v:.6g}" for v in row])
    finally:
        if stream is not sys.stdout:
            stream.close()
    if stream is not sys.stdout:
        print(f"{len(pred)} predictions written to {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowgmm-fast", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit a FlowGMMClassifier and save it")
    f.add_argument("data", help=".csv or .npz")
    f.add_argument("--label-column", help="CSV column with the labels (name or 0-based index); empty cell = "
                   "unlabeled")
    f.add_argument("--out", help="model folder (default: a new runs/flowgmm-<time>-<random>)")
    f.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    f.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="an estimator parameter (JSON value), repeatable")
    f.add_argument("--random-state", type=int)
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=cmd_fit)
    q = sub.add_parser("predict", help="predict classes and probabilities with a saved model")
    q.add_argument("model", help="folder written by fit")
    q.add_argument("data", help=".csv or .npz")
    q.add_argument("--out", help="predictions CSV (default: standard output)")
    q.add_argument("--label-column", help="a label column in the data to ignore (CSV without header names)")
    q.add_argument("--device", help="override the saved device (e.g. cpu)")
    q.set_defaults(func=cmd_predict)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"flowgmm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the estimator's input errors name what is wrong
        print(f"flowgmm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
