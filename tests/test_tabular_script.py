"""experiments/train_semisup_flowgmm_tabular.py end to end on tiny files: a custom npz with a split file, a CSV with a
test fraction, the MiniBooNE loader path, exact resume, and argument errors."""

import json
import os

import numpy as np
import pytest
import torch

from flowgmm_fast.data import tabular as T
from flowgmm_fast.training import read_checkpoint
from helpers import load_experiment


def _script():
    return load_experiment("train_semisup_flowgmm_tabular")


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 4)) * 0.5 + np.eye(3, 4)[y] * 4
    return x.astype(np.float32), y


COMMON = ["--no-progress", "--threads", "1", "--hidden-dim", "16", "--num-coupling-layers", "2", "--batch-size", "50",
          "--lr", "3e-3"]


def test_custom_npz_with_split_trains_and_writes_metrics(tmp_path):
    x, y = _blobs(200, 0)
    xt, yt = _blobs(100, 1)
    T.save_features(str(tmp_path / "f.npz"), x, y, xt, yt)
    T.save_split(str(tmp_path / "split.txt"), T.balanced_labeled_indices(y, 9, seed=0))
    run = tmp_path / "run"
    result = _script().main(["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--split",
                             str(tmp_path / "split.txt"), "--epochs", "40", "--run-dir", str(run), *COMMON])
    assert result["labels"] == 9 and result["steps"] == 40 * 4 and result["classes"] == 3
    assert result["test_accuracy"] > 0.9        # three well separated blobs
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] == result["test_accuracy"]
    assert (run / "last.pt").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run))


def test_invertible_backprop_flag_trains_the_same_model(tmp_path):
    x, y = _blobs(120, 3)
    T.save_features(str(tmp_path / "f.npz"), x, y, x[:30], y[:30])
    args = ["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--num-labeled", "6", "--epochs", "2",
            "--dropout", "0.5", *COMMON]
    script = _script()
    std = script.main([*args, "--run-dir", str(tmp_path / "std")])
    inv = script.main([*args, "--run-dir", str(tmp_path / "inv"), "--invertible-backprop",
                       "--invertible-checkpoint-every", "2"])
    assert inv["steps"] == std["steps"] == 6
    # the same function (not bitwise the same weights: some gradients are 0 in exact arithmetic, e.g. the
    # weight-norm direction of a per-channel scale, and AdamW turns their rounding noise into full steps)
    assert inv["test_nll"] == pytest.approx(std["test_nll"], rel=1e-4)
    assert inv["test_accuracy"] == std["test_accuracy"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    x, y = _blobs(120, 2)
    T.save_features(str(tmp_path / "f.npz"), x, y, x[:30], y[:30])
    args = ["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--num-labeled", "6", "--epochs", "3",
            *COMMON]
    script = _script()
    full = script.main([*args, "--run-dir", str(tmp_path / "full")])
    script.main([*args, "--run-dir", str(tmp_path / "part"), "--stop-at", "5"])
    resumed = script.main([*args, "--run-dir", str(tmp_path / "part"), "--resume"])
    assert resumed["steps"] == full["steps"] == 9
    a = read_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = read_checkpoint(tmp_path / "part" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_csv_with_test_fraction_and_miniboone_loader(tmp_path):
    x, y = _blobs(90, 3)
    with open(tmp_path / "f.csv", "w") as f:
        f.write("a,b,c,d,label\n")
        for row, lab in zip(x, y):
            f.write(",".join(f"{v:.5f}" for v in row) + f",{lab}\n")
    r = _script().main(["--dataset", "custom", "--features", str(tmp_path / "f.csv"), "--label-column", "label",
                        "--test-fraction", "0.3", "--num-labeled", "6", "--max-steps", "3",
                        "--run-dir", str(tmp_path / "csv"), *COMMON])
    assert r["dim"] == 4 and r["steps"] == 3
    rng = np.random.default_rng(0)
    with open(tmp_path / T.MINIBOONE_FILE, "w") as f:
        f.write("30 40\n")
        for i in range(70):
            f.write(" ".join(f"{v:.4E}" for v in rng.normal(1.0 if i < 30 else -1.0, 1, 50)) + "\n")
    r = _script().main(["--dataset", "miniboone", "--data-root", str(tmp_path), "--max-steps", "2",
                        "--run-dir", str(tmp_path / "mb"), *COMMON])
    assert r["labels"] == 20 and r["dim"] == 50 and r["classes"] == 2


def test_argument_errors(tmp_path):
    script = _script()
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "custom"])                     # no --features
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "hepmass"])                    # no --data-root
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "digits", "--lr", "0"])
    x, y = _blobs(30, 0)
    T.save_features(str(tmp_path / "f.npz"), x, y)
    with pytest.raises(SystemExit, match="no test set"):
        script.main(["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--num-labeled", "3",
                     "--run-dir", str(tmp_path / "r"), *COMMON])


def test_labels_per_class_on_an_imbalanced_table_and_run_folders_per_table(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100, np.int64), np.ones(4, np.int64)]  # class 1 has 4 rows
    x = rng.normal(size=(104, 3)) + 3.0 * y[:, None]
    T.save_features(str(tmp_path / "imb.npz"), x, y, x[:20], y[:20])
    T.save_features(str(tmp_path / "other.npz"), x, y, x[:20], y[:20])
    script = _script()
    base = ["--dataset", "custom", "--max-steps", "2", *COMMON]
    with pytest.raises(SystemExit, match="--labels-per-class"):  # 5 per class cannot be balanced here
        script.main([*base, "--features", str(tmp_path / "imb.npz"), "--num-labeled", "10",
                     "--run-dir", str(tmp_path / "r")])
    r = script.main([*base, "--features", str(tmp_path / "imb.npz"), "--labels-per-class", "5",
                     "--run-dir", str(tmp_path / "r")])
    assert r["labels"] == 5 + 4
    with pytest.raises(SystemExit):
        script.parse_args([*base, "--features", "f.npz", "--labels-per-class", "0"])
    monkeypatch.chdir(tmp_path)
    a = script.parse_args([*base, "--features", str(tmp_path / "imb.npz"), "--labels-per-class", "5"]).run_dir
    b = script.parse_args([*base, "--features", str(tmp_path / "other.npz"), "--labels-per-class", "5"]).run_dir
    assert a != b and "imb" in a and "other" in b
    assert a == script.parse_args([*base, "--features", str(tmp_path / "imb.npz"), "--labels-per-class", "5"]).run_dir


def test_predict_new_rows_from_a_run_with_its_stored_standardisation(tmp_path):
    x, y = _blobs(150, 2)
    x = x * 50.0 + 300.0  # far from standardised: a prediction that skipped the stored scaler would be wrong
    T.save_features(str(tmp_path / "f.npz"), x, y, x[:40], y[:40])
    script = _script()
    base = ["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--run-dir", str(tmp_path / "run")]
    trained = script.main([*base, "--num-labeled", "9", "--epochs", "3", *COMMON])
    with open(tmp_path / "new.csv", "w") as f:
        f.write("a,b,c,d\n")
        for row in x[:40]:
            f.write(",".join(f"{v:.6f}" for v in row) + "\n")
    r = script.main([*base, "--predict", str(tmp_path / "new.csv"), "--predictions", str(tmp_path / "p.csv")])
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "class,p_0,p_1,p_2" and len(lines) == 41 and r["rows"] == 40
    pred = np.array([int(line.split(",")[0]) for line in lines[1:]])
    assert np.mean(pred == y[:40]) == pytest.approx(trained["test_accuracy"], abs=1e-6)  # the run's own test rows
    probs = np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    with pytest.raises(SystemExit, match="feature columns"):
        np.savez(tmp_path / "bad.npz", x=x[:5, :3])
        script.main([*base, "--predict", str(tmp_path / "bad.npz")])


def test_step_in_backward_flag_trains_the_same_model_resumes_across_modes_and_refuses_clipping(tmp_path):
    x, y = _blobs(120, 4)
    T.save_features(str(tmp_path / "f.npz"), x, y, x[:30], y[:30])
    args = ["--dataset", "custom", "--features", str(tmp_path / "f.npz"), "--num-labeled", "6", "--epochs", "3",
            "--dropout", "0.5", "--invertible-backprop", *COMMON]
    script = _script()
    # the standard step clips at 100 by default; on this tiny model the norm stays below it (clipping is a no-op)
    std = script.main([*args, "--run-dir", str(tmp_path / "std")])
    fused = script.main([*args, "--run-dir", str(tmp_path / "fused"), "--step-in-backward"])
    assert fused["steps"] == std["steps"] == 9
    a = read_checkpoint(tmp_path / "std" / "last.pt")["model"]
    b = read_checkpoint(tmp_path / "fused" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    # a fused run stopped at step 5 and resumed without the flag continues the same (unclipped) run
    script.main([*args, "--run-dir", str(tmp_path / "part"), "--step-in-backward", "--stop-at", "5"])
    resumed = script.main([*args, "--run-dir", str(tmp_path / "part"), "--resume"])
    assert resumed["steps"] == 9
    c = read_checkpoint(tmp_path / "part" / "last.pt")
    assert c["extra"]["args"]["max_grad_norm"] is None
    for k in b:
        torch.testing.assert_close(c["model"][k], b[k], rtol=0, atol=0, msg=k)
    with pytest.raises(SystemExit):
        script.parse_args([*args, "--step-in-backward", "--max-grad-norm", "5"])
    with pytest.raises(SystemExit, match="clips the gradient norm"):  # a clipped run cannot continue fused
        script.main([*args, "--run-dir", str(tmp_path / "std"), "--resume", "--step-in-backward"])
