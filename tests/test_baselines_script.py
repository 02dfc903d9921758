"""experiments/train_semisup_text_baselines.py: one command, the FlowGMM script's data flags, a table per method."""

import numpy as np
import pytest

from flowgmm_fast.data import tabular as T
from helpers import load_experiment

pytest.importorskip("sklearn")


def _script():
    return load_experiment("train_semisup_text_baselines")


def test_baselines_script_on_npz_features(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 160)
    x = rng.normal(size=(160, 8)) * 0.3 + np.eye(4, 8)[y] * 3   # stands in for sentence embeddings
    T.save_features(str(tmp_path / "emb.npz"), x[:120], y[:120], x[120:], y[120:])
    res = _script().main(["--dataset", "ag_news", "--features", str(tmp_path / "emb.npz"), "--num-labeled", "8",
                          "--seeds", "0", "1", "--methods", "knn", "logistic_regression", "mlp", "--nn-steps", "30"])
    assert set(res) == {"knn", "logistic_regression", "mlp"} and all(len(v) == 2 for v in res.values())
    assert min(min(v) for v in res.values()) > 0.6          # chance is 0.25
    out = capsys.readouterr().out
    assert "| ag_news (8 labels)" in out and "| logistic_regression |" in out


def test_baselines_script_split_file(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 30)
    x = rng.normal(size=(60, 3)) + y[:, None] * 4
    T.save_features(str(tmp_path / "f.npz"), x, y, x, y)
    T.save_split(str(tmp_path / "s.txt"), [0, 1, 30, 31])
    res = _script().main(["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--split",
                          str(tmp_path / "s.txt"), "--methods", "knn"])
    assert res["knn"][0] > 0.9
