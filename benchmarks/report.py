"""Tables, plots and the README's Performance block, generated from the newest results files.

For every device found in ``benchmarks/results/`` (``ops_*.json`` from :mod:`benchmarks.bench_ops`,
``train_step_*.json`` from :mod:`benchmarks.bench_train_step`) the newest file of each kind is read and turned into
  * ``benchmarks/results/report.md``: every op and step figure, and the issues' targets with measured values;
  * ``benchmarks/results/perf_<device>.png``: speed-up over torch-eager per op case and per training step;
  * the block between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` in README.md: the targets, the headline cases
    and the plots (the rest of README.md is not touched; without the markers the block is printed instead).
Nothing is typed in by hand: every figure comes from a results file, named in the output with its commit and date.

Usage: ``python -m benchmarks.report [--results-dir DIR] [--readme README.md] [--no-readme]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
FAST = ("triton", "native")

# The issues' bars: (device type, op, case, backend group, metric, threshold, text).
OP_TARGETS = [
    ("cpu", "coupling_fwdbwd", "target-c12-16x16-b64", "native", "x_eager", 3.0,
     "native coupling fwd+bwd (B=64, C=12, 16x16) >= 3x eager"),
    ("cpu", "coupling_fwdbwd", "target-vec-b256-d768", "native", "x_eager", 3.0,
     "native coupling fwd+bwd (B=256, D=768) >= 3x eager"),
    ("cpu", "gmm_fwdbwd", "target-b512-d784", "native", "x_eager", 2.0,
     "native GMM NLL fwd+bwd (B=512, D=784, K=10) >= 2x eager"),
    ("cuda", "coupling_fwdbwd", "target-c12-16x16-b64", FAST, "x_eager", 4.0,
     "coupling fwd+bwd (B=64, C=12, 16x16) >= 4x eager"),
    ("cuda", "coupling_fwdbwd", "target-c12-16x16-b64", FAST, "x_compile", 1.0,
     "coupling fwd+bwd (B=64, C=12, 16x16) not slower than torch.compile"),
    ("cuda", "coupling_fwdbwd", "large-c12-64x64-b256", FAST, "pct_copy_bw", 75.0,
     "coupling fwd+bwd (B=256, C=12, 64x64) >= 75% of copy bandwidth"),
    ("cuda", "gmm_fwdbwd", "target-b4096-d3072", FAST, "x_eager", 3.0,
     "GMM NLL fwd+bwd (B=4096, D=3072, K=10) >= 3x eager closed form"),
    ("cuda", "gmm_fwdbwd", "target-b4096-d3072", FAST, "x_original", 100.0,
     "GMM NLL fwd+bwd (B=4096, D=3072, K=10) >= 100x the original full-covariance prior"),
]
# The training step bars (GPU): the CIFAR-10 step at batch 64.
STEP_TARGETS = [("x_eager", 1.3, ">= 1.3x eager reference"), ("x_original", 3.0, ">= 3x the original formulation"),
                ("peak_ratio", 1.0, "peak memory <= eager's")]

# Cases shown in the README block (the full set is in report.md).
HEADLINE = {
    "cpu": [("coupling_fwdbwd", "target-c12-16x16-b64"), ("coupling_fwdbwd", "target-vec-b256-d768"),
            ("coupling_fwdbwd", "tabular-b5000-d768"), ("coupling_fwdbwd", "cifar-s0-ckbd-b64"),
            ("coupling_fwd", "cifar-s0-ckbd-b64"), ("coupling_inv", "cifar-s0-ckbd-b64"), ("squeeze", "cifar-b256"),
            ("logit", "cifar-b256"),
            ("gmm_fwdbwd", "target-b512-d784"), ("gmm_fwdbwd", "mnist-b64"), ("gmm_fwdbwd", "cifar-b64")],
    "cuda": [("coupling_fwdbwd", "target-c12-16x16-b64"), ("coupling_fwdbwd", "cifar-s0-ckbd-b64"),
             ("coupling_fwdbwd", "large-c12-64x64-b256"), ("coupling_fwdbwd", "tabular-b5000-d768"),
             ("coupling_fwd", "large-c12-64x64-b256"), ("squeeze", "large-b256-c12-128"),
             ("logit", "large-b256-c3-256"), ("gmm_fwdbwd", "target-b4096-d3072"), ("gmm_fwdbwd", "cifar-b64")],
}


# ------------------------------------------------------------------------------------------------------- loading
def newest_runs(results_dir: Path) -> dict[str, dict[str, dict]]:
    """{device_tag: {kind: data}}: the newest file (by its recorded date) of each kind for each device."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = common.load_results(path)
        except (ValueError, OSError) as exc:
            print(f"report: skipping {path}: {exc}", file=sys.stderr)
            continue
        data["path"] = path
        tag, kind = data["meta"]["device_tag"], data["kind"]
        old = out.setdefault(tag, {}).get(kind)
        if old is None or data["meta"]["date_utc"] >= old["meta"]["date_utc"]:
            out[tag][kind] = data
    return out


def _ok(rec: dict) -> bool:
    return "error" not in rec and rec.get("median_ms") is not None


def _add_original_ratio(records: list[dict]) -> None:
    """x_original for GMM records: the original full-covariance prior's time over this candidate's, same case."""
    orig = {(r["op"], r["case"], r["dtype"]): r["median_ms"] for r in records
            if r["backend"] == "original-fullcov" and _ok(r)}
    for r in records:
        o = orig.get((r["op"], r["case"], r["dtype"]))
        if o is not None and _ok(r):
            r["x_original"] = o / r["median_ms"]


# ------------------------------------------------------------------------------------------------------- tables
def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def run_line(data: dict) -> str:
    m = data["meta"]
    dirty = " (uncommitted changes)" if m.get("git_dirty") else ""
    extra = ""
    if "copy_bandwidth" in data:
        extra = f", copy bandwidth {data['copy_bandwidth']['gbps']:.0f} GB/s"
    timed = data.get("backends_timed", m["backends_available"])
    return (f"{m['device']}; torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}; fast backends timed: "
            f"{', '.join(timed) or 'none'}; commit `{str(m['git_commit'])[:8]}`{dirty}; {m['date_utc']}{extra}; "
            f"file `{Path(data['path']).name}`")


def target_rows(ops: dict | None, steps: dict | None, device_type: str) -> list[list[str]]:
    """[target, backend, measured, met] rows for the issues' bars on this device type."""
    rows = []
    if ops is not None:
        recs = ops["records"]
        _add_original_ratio(recs)
        for dev, op, case, group, metric, bar, text in OP_TARGETS:
            if dev != device_type:
                continue
            group = (group,) if isinstance(group, str) else group
            found = [r for r in recs if r["op"] == op and r["case"] == case and r["backend"] in group
                     and r["dtype"] == "float32"]
            if not found:
                rows.append([text, "/".join(group), "not measured (backend unavailable or case not run)", "-"])
            for r in found:
                if not _ok(r):
                    rows.append([text, r["backend"], f"error: {r['error'][:60]}", "no"])
                    continue
                val = r.get(metric)
                shown = "-" if val is None else (f"{val:.0f}%" if metric == "pct_copy_bw" else f"{val:.2f}x")
                rows.append([text, r["backend"], f"{shown} ({common.fmt_ms(r['median_ms'])} ms)",
                             "-" if val is None else ("yes" if val >= bar else "no")])
    if steps is not None and device_type == "cuda":
        recs = [r for r in steps["records"] if r["config"] == "cifar"]
        eager = next((r for r in recs if r["backend"] == "torch" and r["variant"] == "eager" and _ok(r)), None)
        for r in recs:
            if r["backend"] not in FAST or not _ok(r):
                continue
            peak_ratio = (r["peak_mb"] / eager["peak_mb"]) if eager and eager.get("peak_mb") else None
            for metric, bar, text in STEP_TARGETS:
                val = peak_ratio if metric == "peak_ratio" else r.get(metric)
                met = "-" if val is None else ("yes" if (val <= bar if metric == "peak_ratio" else val >= bar) else "no")
                shown = "-" if val is None else f"{val:.2f}x"
                rows.append([f"CIFAR-10 step, batch 64: {text}", f"{r['backend']}/{r['variant']}",
                             f"{shown} ({common.fmt_ms(r['median_ms'])} ms)", met])
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ops_table(data: dict, only: list[tuple[str, str]] | None = None) -> str:
    """One row per (op, case, dtype); one column per candidate: median ms and speed-up over eager / compile."""
    recs = data["records"]
    backends = []
    for r in recs:
        if r["backend"] not in backends:
            backends.append(r["backend"])
    keys = []
    for r in recs:
        k = (r["op"], r["case"], r["dtype"])
        if k not in keys and (only is None or (r["op"], r["case"]) in only):
            keys.append(k)
    if only is not None:
        keys.sort(key=lambda k: only.index((k[0], k[1])))
    rows = []
    for op, case, dtype in keys:
        shape = next(r["shape"] for r in recs if (r["op"], r["case"], r["dtype"]) == (op, case, dtype))
        row = [op, f"{case} {tuple(shape)}" + ("" if dtype == "float32" else f" {dtype}")]
        for b in backends:
            r = next((r for r in recs if (r["op"], r["case"], r["dtype"], r["backend"]) == (op, case, dtype, b)), None)
            if r is None:
                row.append("")
            elif not _ok(r):
                row.append("error")
            else:
                cell = f"{common.fmt_ms(r['median_ms'])} [{common.fmt_ms(r['q20_ms'])}, {common.fmt_ms(r['q80_ms'])}]"
                if b != "torch-eager":
                    cell += f" {_x(r.get('x_eager'))}"
                if b not in ("torch-eager", "torch-compile") and r.get("x_compile") is not None:
                    cell += f" / {_x(r.get('x_compile'))}c"
                if b != "torch-eager" and r.get("paired_vs_eager") is not None:  # files before the paired timing: none
                    cell += f" p{r['paired_vs_eager']:.2f}"
                if data["meta"]["device_type"] == "cuda":
                    cell += f" {r['gbps']:.0f} GB/s"
                row.append(cell)
        rows.append(row)
    return _md_table(["op", "case (shape)"] + backends, rows)


def steps_table(data: dict) -> str:
    rows = []
    for r in data["records"]:
        if not _ok(r):
            rows.append([r["config"], r["backend"], r["variant"], "error: " + r.get("error", "")[:70], "", "", "", "",
                         ""])
            continue
        pk = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        loss = "-" if r.get("loss_first") is None else f"{r['loss_first']:.6g}"
        rows.append([r["config"], r["backend"], r["variant"], common.fmt_ms(r["median_ms"]),
                     f"[{common.fmt_ms(r['q20_ms'])}, {common.fmt_ms(r['q80_ms'])}]", _x(r.get("x_eager")),
                     _x(r.get("x_original")), pk, loss])
    notes = sorted({f"{r['config']}: {r['note']}" for r in data["records"] if r.get("note")})
    text = _md_table(["config", "backend", "variant", "median ms", "[q20, q80]", "vs eager", "vs original",
                      "peak MB", "first loss"], rows)
    return text + ("\n\n" + "; ".join(notes) + "." if notes else "")


# --------------------------------------------------------------------------------------------------------- plots
def plot(runs: dict[str, dict], path: Path, device_tag: str) -> Path | None:
    """Horizontal bars of the speed-up over torch-eager (log scale): op cases (left) and training steps (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops, steps = runs.get("ops"), runs.get("train_step")
    if ops is None and steps is None:
        return None
    panels = [p for p in (ops, steps) if p is not None]
    rows = max(len({(r.get("op"), r.get("case"), r.get("config")) for r in p["records"]}) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), max(4.0, 1.0 + 0.32 * rows)), squeeze=False)
    for ax, data in zip(axes[0], panels):
        if data is ops:
            recs = [r for r in ops["records"] if _ok(r) and r["backend"] != "torch-eager"]
            keys = list(dict.fromkeys((r["op"], r["case"], r["dtype"]) for r in recs))
            label = lambda k: f"{k[0]} {k[1]}" + ("" if k[2] == "float32" else f" {k[2]}")  # noqa: E731
            group = lambda r: (r["op"], r["case"], r["dtype"])  # noqa: E731
            series = list(dict.fromkeys(r["backend"] for r in recs))
            title = "ops: speed-up over torch eager"
        else:
            recs = [r for r in steps["records"] if _ok(r) and not (r["backend"] == "torch" and r["variant"] == "eager")]
            keys = list(dict.fromkeys(r["config"] for r in recs))
            label = lambda k: k  # noqa: E731
            group = lambda r: r["config"]  # noqa: E731
            series = list(dict.fromkeys(f"{r['backend']}/{r['variant']}" for r in recs))
            title = "training step: speed-up over torch eager"
        height = 0.8 / max(len(series), 1)
        for j, name in enumerate(series):
            ys, xs = [], []
            for i, k in enumerate(keys):
                for r in recs:
                    rname = r["backend"] if data is ops else f"{r['backend']}/{r['variant']}"
                    if rname == name and group(r) == k and r.get("x_eager"):
                        ys.append(i + j * height)
                        xs.append(r["x_eager"])
            ax.barh(ys, xs, height=height, label=name)
        ax.set_yticks([i + (len(series) - 1) * height / 2 for i in range(len(keys))])
        ax.set_yticklabels([label(k) for k in keys], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", which="both", alpha=0.3)
    meta = (ops or steps)["meta"]
    fig.suptitle(f"{meta['device']} | torch {meta['torch']} | commit {str(meta['git_commit'])[:8]} | "
                 f"{meta['date_utc']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------- outputs
def _section(tag: str, runs: dict, full: bool, png: Path | None, rel_to: Path) -> str:
    ops, steps = runs.get("ops"), runs.get("train_step")
    device_type = (ops or steps)["meta"]["device_type"]
    title = (ops or steps)["meta"]["device"]
    parts = [f"### {title}" if full else f"#### {title}"]
    for data in (ops, steps):
        if data is not None:
            parts.append(f"- {data['kind']}: {run_line(data)}")
    rows = target_rows(ops, steps, device_type)
    if rows:
        parts.append("\nTargets of the issues, as measured:\n\n" + _md_table(["target", "backend", "measured", "met"],
                                                                              rows))
    if ops is not None:
        only = None if full else HEADLINE.get(device_type)
        if only is not None and not any((r["op"], r["case"]) in only for r in ops["records"]):
            only = None
        parts.append(("\nOps" if full else "\nSelected ops") + " -- median ms [20%, 80%], then the speed-up over "
                     "torch-eager (and over torch.compile, `c`), `p`: the median over interleaved rounds of t / t_eager of the same "
                     "round (files that have it)" + (", achieved GB/s" if device_type == "cuda" else "")
                     + ":\n\n" + ops_table(ops, only))
    if steps is not None:
        parts.append("\nTraining step (forward, prior, backward, clip, Adam); the first step's loss is taken from the "
                     "same weights, data and seed in every variant:\n\n" + steps_table(steps))
    if png is not None:
        try:
            rel = png.relative_to(rel_to)
        except ValueError:
            rel = png
        parts.append(f"\n![speed-ups on {title}]({rel.as_posix()})")
    return "\n".join(parts)


def build(results_dir: Path, readme: Path | None, write_readme: bool = True, out=None) -> dict:
    """Write report.md and the PNGs under ``results_dir``; update (or print to ``out``, default stdout) the README
    block. Returns the paths, whether the README was updated, and the block."""
    out = sys.stdout if out is None else out
    results_dir = Path(results_dir)
    # devices with op or training-step results (an import-time file alone has no section: bench_import prints it)
    runs = {tag: r for tag, r in newest_runs(results_dir).items() if "ops" in r or "train_step" in r}
    if not runs:
        raise SystemExit(f"report: no results files in {results_dir}; run benchmarks/run_cpu.sh first")
    pngs = {tag: plot(r, results_dir / f"perf_{tag}.png", tag) for tag, r in sorted(runs.items())}
    order = sorted(runs, key=lambda t: (t.startswith("cpu"), t))  # GPUs first
    header = ("Generated by `python -m benchmarks.report` from the newest results files in `benchmarks/results/`; "
              "CPU figures come from a 2-core machine shared with other jobs, so read the ratios (measured side by "
              "side in one run) rather than the absolute times.")
    report = "# Benchmark report\n\n" + header + "\n\n" + "\n\n".join(
        _section(t, runs[t], True, pngs[t], results_dir) for t in order) + "\n"
    report_path = results_dir / "report.md"
    report_path.write_text(report)
    root = readme.parent if readme is not None else common.ROOT
    block = "\n".join([START, "", header + " Full tables: `benchmarks/results/report.md`.", ""] +
                      [_section(t, runs[t], False, pngs[t], root) + "\n" for t in order] + [END])
    result = {"report": report_path, "pngs": pngs, "readme_updated": False}
    if write_readme:
        text = readme.read_text() if readme is not None and readme.exists() else None
        if text is not None and START in text and END in text and text.index(START) < text.index(END):
            new = text[:text.index(START)] + block + text[text.index(END) + len(END):]
            readme.write_text(new)
            result["readme_updated"] = True
        else:
            print(f"report: {readme} has no {START} ... {END} markers; the block to insert:\n", file=out)
            print(block, file=out)
    result["block"] = block
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--readme", default=str(common.ROOT / "README.md"))
    p.add_argument("--no-readme", action="store_true", help="write report.md and the plots only")
    args = p.parse_args(argv)
    result = build(Path(args.results_dir), Path(args.readme), not args.no_readme)
    print(f"report: wrote {result['report']} and {', '.join(str(p) for p in result['pngs'].values() if p)}"
          + ("; README block updated" if result["readme_updated"] else ""))
    return result


if __name__ == "__main__":
    main()
