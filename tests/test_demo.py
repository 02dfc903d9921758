"""The demo (experiments/demo.py) end to end in its quick mode: the figure and the printed / written table exist."""

import re

import pytest

from helpers import load_experiment

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def _load_demo():
    return load_experiment("demo")


@pytest.mark.slow
def test_demo_quick_writes_figure_and_table(tmp_path, capsys):
    demo = _load_demo()
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    fig = out / "demo.png"
    assert fig.exists() and fig.stat().st_size > 10_000
    with open(fig, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    for method in ("FlowGMM (labeled + unlabeled)", "FlowGMM (labels only)", "logistic regression (labels only)"):
        assert method in printed and method in table
        row = next(line for line in printed.splitlines() if line.startswith(f"| {method} |"))
        accs = [float(a) for a in re.findall(r"([0-9.]+)%", row)]
        assert len(accs) == 2 and all(0 <= a <= 100 for a in accs)
    assert "two moons (6 labels)" in printed and "sklearn digits (100 labels)" in printed


def test_demo_rejects_bad_steps():
    demo = _load_demo()
    with pytest.raises(SystemExit):
        demo.parse_args(["--moons-steps", "0"])
