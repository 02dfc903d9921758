"""The ``flowgmm-fast`` command line: fit on a CSV / npz with unlabeled rows, predict from a saved model in a new
process, run folders that never collide, and clear errors."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from flowgmm_fast import cli

PARAMS = ["--param", "n_estimators=1", "--param", "max_epochs=10", "--no-progress", "--random-state", "0"]


def _table(n=150, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 3)) + 3.0 * y[:, None]
    return x, y


def _write_csv(path, x, labels, header=True):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["a", "b", "c", "kind"])
        for row, lab in zip(x, labels):
            w.writerow([f"{v:.6f}" for v in row] + [lab])


def test_fit_and_predict_csv_with_empty_label_cells(tmp_path, capsys):
    x, y = _table()
    names = np.array(["cat", "dog"])
    labels = ["" for _ in y]
    for i in np.concatenate([np.flatnonzero(y == 0)[:5], np.flatnonzero(y == 1)[:5]]):
        labels[i] = names[y[i]]
    _write_csv(tmp_path / "train.csv", x, labels)
    assert cli.main(["fit", str(tmp_path / "train.csv"), "--label-column", "kind", "--out",
                     str(tmp_path / "model"), *PARAMS]) == 0
    out = capsys.readouterr().out
    assert "10 labeled, 140 unlabeled" in out and "model written to" in out
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary["classes"] == ["cat", "dog"] and summary["feature_columns"] == ["a", "b", "c"]
    # predict in a fresh process, from a file whose columns come in another order (matched by name)
    with open(tmp_path / "new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["c", "a", "b"])
        for row in x[:20]:
            w.writerow([f"{row[2]:.6f}", f"{row[0]:.6f}", f"{row[1]:.6f}"])
    res = subprocess.run([sys.executable, "-m", "flowgmm_fast.cli", "predict", str(tmp_path / "model"),
                          str(tmp_path / "new.csv"), "--out", str(tmp_path / "pred.csv")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = list(csv.reader(open(tmp_path / "pred.csv")))
    assert rows[0] == ["prediction", "proba_cat", "proba_dog"] and len(rows) == 21
    pred = np.array([r[0] for r in rows[1:]])
    assert np.mean(pred == names[y[:20]]) > 0.9
    np.testing.assert_allclose([float(r[1]) + float(r[2]) for r in rows[1:]], 1.0, atol=1e-5)


def test_fit_npz_default_run_folders_never_collide(tmp_path, monkeypatch):
    x, y = _table()
    ys = np.full_like(y, -1)
    ys[:6] = y[:6]
    ys[np.flatnonzero(y == 1)[:3]] = 1
    ys[np.flatnonzero(y == 0)[:3]] = 0
    np.savez(tmp_path / "t.npz", X=x, y=ys)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "t.npz", *PARAMS]) == 0
    assert cli.main(["fit", "t.npz", *PARAMS]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "config.json").exists() for r in runs)
    assert cli.main(["predict", str(runs[0]), "t.npz", "--out", "p.csv"]) == 0
    assert len(open("p.csv").read().splitlines()) == len(x) + 1


def test_cli_errors_name_the_problem(tmp_path, capsys):
    x, y = _table(40)
    _write_csv(tmp_path / "t.csv", x, [str(v) for v in y])
    assert cli.main(["fit", str(tmp_path / "t.csv"), "--label-column", "nope", *PARAMS]) == 2
    assert "--label-column 'nope' is not a column" in capsys.readouterr().err
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("a,b,kind\n1.0,,0\n2.0,3.0,1\n")
    assert cli.main(["fit", str(tmp_path / "bad.csv"), "--label-column", "kind", *PARAMS]) == 2
    assert "line 2, column 'b'" in capsys.readouterr().err
    assert cli.main(["fit", str(tmp_path / "t.csv"), "--label-column", "kind", "--param", "bogus=1", *PARAMS]) == 2
    assert "bogus" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("keep me")
    assert cli.main(["fit", str(tmp_path / "t.csv"), "--label-column", "kind", "--out", str(tmp_path / "busy"),
                     *PARAMS]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "busy" / "x.txt").read_text() == "keep me"
    assert cli.main(["predict", str(tmp_path / "busy"), str(tmp_path / "t.csv")]) == 2
    assert "does not hold a saved FlowGMMClassifier" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["fit"])
