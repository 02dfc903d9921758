"""experiments/tabular_benchmark.py: the runner's pipeline on a tiny budget (--quick), its files and its targets
table; the accuracy itself is measured by running it (experiments/RESULTS.md), not here."""

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("sklearn")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runner():
    spec = importlib.util.spec_from_file_location("tabular_benchmark",
                                                  os.path.join(ROOT, "experiments", "tabular_benchmark.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tabular_benchmark"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_runner_writes_results_and_checks_targets(tmp_path):
    out = tmp_path / "bench"
    assert _runner().main(["--quick", "--tables", "wine", "breast_cancer_imb", "--labels", "4", "--seeds", "0",
                           "--methods", "FlowGMM", "LR (labels only)", "majority",
                           "--variant", 'uniform={"class_prior": "uniform"}', "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"FlowGMM", "FlowGMM[flow]", "FlowGMM[graph]", "FlowGMM[student]",
                                          "FlowGMM[mean]", "FlowGMM[start 0.05]", "FlowGMM[uniform]",
                                          "LR (labels only)", "majority"}
    assert len(rows) == 2 * 9 and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # each row has its own time: an ablation row's is its fit_graph, not the fit's (which it used to repeat)
    fit_s = {(r["table"], r["method"]): r["fit_s"] for r in rows}
    assert all(v >= 0.0 for v in fit_s.values())
    for table in ("wine", "breast_cancer_imb"):
        assert fit_s[(table, "FlowGMM[graph]")] != fit_s[(table, "FlowGMM")]
    text = (out / "results.md").read_text()
    assert "| breast_cancer_imb | 4 |" in text and "imbalanced" in text
    assert "of 2 (table, labels) cells" in text


def test_runner_with_flowgmm_rows_only(tmp_path):
    # an ablation run (no baseline): the targets table says so instead of failing
    out = tmp_path / "abl"
    assert _runner().main(["--quick", "--tables", "wine", "--labels", "4", "--seeds", "0", "--methods", "FlowGMM",
                           "--out", str(out)]) == 0
    assert "no baseline run" in (out / "results.md").read_text()
