"""experiments/image_baselines.py: the classical baselines on an image dataset's own label split."""

import json

import numpy as np
import pytest
from helpers import load_experiment
from test_data_images import write_idx

pytest.importorskip("sklearn")


def _prepared(tmp_path, n_train=80, n_test=30):
    """A tiny dataset in MNIST's IDX format whose classes differ in mean brightness, prepared under a new name."""
    src = write_idx(tmp_path / "src", n_train=n_train, n_test=n_test, size=(6, 6), num_classes=4)
    for prefix, n in (("train", n_train), ("t10k", n_test)):  # make the classes separable: brightness by class
        path = src / f"{prefix}-images-idx3-ubyte"
        raw = bytearray(path.read_bytes())
        images = np.frombuffer(bytes(raw[16:]), np.uint8).reshape(n, 36) // 4
        images = images + (np.arange(n) % 4)[:, None].astype(np.uint8) * 60
        path.write_bytes(bytes(raw[:16]) + images.astype(np.uint8).tobytes())
    load_experiment("prepare_data").main(["--dataset", "tiny_idx", "--source", str(src), "--out",
                                          str(tmp_path / "data"), "--num_labels", "8", "--seeds", "0"])
    data = tmp_path / "data"
    return data / "images" / "tiny_idx", data / "labels" / "tiny_idx" / "8_balanced_labels" / "0.npz"


def test_image_baselines_on_an_idx_dataset(tmp_path, capsys):
    images, split = _prepared(tmp_path)
    out = tmp_path / "res" / "b.json"
    res = load_experiment("image_baselines").main(["--dataset", "tiny_idx", "--data_path", str(images),
                                                   "--label_path", str(split), "--pca", "5", "--out", str(out)])
    assert set(res) == {"knn", "logistic_regression", "label_spreading"}
    assert all(r["test_acc"] > 0.9 for r in res.values()), res  # chance is 0.25
    text = capsys.readouterr().out
    assert "tiny_idx: 80 train (8 labeled), 30 test | features: PCA-5 of the pixels" in text
    assert "| label_spreading |" in text
    saved = json.loads(out.read_text())
    assert saved["num_labeled"] == 8 and saved["pca"] == 5 and saved["results"] == res


def test_image_baselines_raw_pixels_and_bad_pca(tmp_path):
    images, split = _prepared(tmp_path)
    script = load_experiment("image_baselines")
    res = script.main(["--dataset", "tiny_idx", "--data_path", str(images), "--label_path", str(split),
                       "--pca", "0", "--methods", "knn"])
    assert set(res) == {"knn"} and res["knn"]["test_acc"] > 0.9
    with pytest.raises(SystemExit, match="--pca: n_components must be at most"):
        script.main(["--dataset", "tiny_idx", "--data_path", str(images), "--label_path", str(split), "--pca", "500"])
    with pytest.raises(SystemExit, match="--pca must be >= 0"):
        script.main(["--dataset", "tiny_idx", "--data_path", str(images), "--label_path", str(split), "--pca", "-1"])
    with pytest.raises(ValueError, match="not 'mnist'"):  # the split's dataset name is checked against the data
        script.main(["--dataset", "MNIST", "--data_path", str(images), "--label_path", str(split)])
