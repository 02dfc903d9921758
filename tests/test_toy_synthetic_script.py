"""experiments/synthetic.py in its quick mode on one data set: the figure and the accuracy table are written."""

import pytest

from helpers import load_experiment

pytest.importorskip("matplotlib")


def _script():
    return load_experiment("synthetic")


@pytest.mark.slow
def test_synthetic_quick(tmp_path, capsys):
    assert _script().main(["--quick", "--datasets", "eight_gaussians", "--out", str(tmp_path), "--no-progress"]) == 0
    png = tmp_path / "eight_gaussians.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "synthetic.md").read_text()
    assert "| eight_gaussians | 16 |" in table and "| eight_gaussians | 16 |" in capsys.readouterr().out


def test_synthetic_rejects_bad_steps():
    with pytest.raises(SystemExit):
        _script().parse_args(["--steps", "0"])
