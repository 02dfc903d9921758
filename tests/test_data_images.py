"""flowgmm_fast.data.images: readers of torchvision's on-disk formats, label splits, the two-stream loader.

CIFAR-10 and SVHN are read from tiny synthetic files written in the exact formats torchvision reads
(cifar-10-batches-py pickles; SVHN *_32x32.mat via scipy.io.savemat) and compared with torchvision's own reader.
Real MNIST is read from /work/shared/datasets/MNIST/raw when present.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowgmm_fast.data import (ImageData, LabelSplitError, SemiSupervisedLoader, augment, balanced_split,
                               canonical_dataset_name, dequantize, eval_batches, label_split_path, load_image_dataset,
                               load_label_split, save_label_split)

MNIST_RAW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "MNIST" / "raw"
REPO = Path(__file__).resolve().parents[1]


def write_cifar10(root: Path, per_batch=6, n_test=5, seed=0) -> Path:
    """cifar-10-batches-py with 5 data batches and a test batch: dicts with 'data' (N, 3072) uint8 and 'labels'."""
    rng = np.random.RandomState(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        entry = {"batch_label": name, "data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
                 "labels": [int(v) for v in rng.randint(0, 10, n)], "filenames": [f"{i}.png" for i in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(entry, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                     "truck"]}, f)
    return root


def write_svhn(root: Path, n_train=40, n_test=7, seed=0) -> Path:
    """train_32x32.mat / test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with digit 0 stored as 10."""
    import scipy.io

    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        y = np.tile(np.arange(1, 11), n // 10 + 1)[:n]
        rng.shuffle(y)
        scipy.io.savemat(root / f"{name}_32x32.mat", {"X": rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8),
                                                      "y": y.reshape(n, 1).astype(np.uint8)})
    return root


# ----------------------------------------------------------------------------------------------- readers
def test_cifar10_reader_matches_torchvision(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    write_cifar10(tmp_path)
    ours = load_image_dataset("CIFAR10", tmp_path, train=True)
    ours_test = load_image_dataset("cifar10", tmp_path, train=False)
    assert ours.images.shape == (30, 3, 32, 32) and ours_test.images.shape == (5, 3, 32, 32)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # batches.meta md5
    for train, data in ((True, ours), (False, ours_test)):
        tv = torchvision.datasets.CIFAR10(str(tmp_path), train=train, download=False)
        np.testing.assert_array_equal(data.images.permute(0, 2, 3, 1).numpy(), tv.data)  # tv: (N, H, W, C)
        np.testing.assert_array_equal(data.labels.numpy(), np.asarray(tv.targets))


def test_svhn_reader_matches_torchvision(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    write_svhn(tmp_path)
    ours = load_image_dataset("SVHN", tmp_path, train=True)
    assert ours.images.shape == (40, 3, 32, 32) and int(ours.labels.max()) == 9 and int(ours.labels.min()) == 0
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    for train in (True, False):
        tv = torchvision.datasets.SVHN(str(tmp_path), split="train" if train else "test", download=False)
        data = load_image_dataset("SVHN", tmp_path, train=train)
        np.testing.assert_array_equal(data.images.numpy(), tv.data)  # tv: (N, C, H, W)
        np.testing.assert_array_equal(data.labels.numpy(), tv.labels)


@pytest.mark.skipif(not MNIST_RAW.exists(), reason="real MNIST not present at ../shared/datasets/MNIST/raw")
def test_mnist_reader_real_files():
    torchvision = pytest.importorskip("torchvision")
    train = load_image_dataset("MNIST", MNIST_RAW, train=True)
    test = load_image_dataset("MNIST", MNIST_RAW.parent, train=False)  # the MNIST/raw layout is found too
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    tv = torchvision.datasets.MNIST(str(MNIST_RAW.parents[1]), train=False, download=False)
    assert torch.equal(test.images[:, 0], tv.data) and torch.equal(test.labels, tv.targets)
    assert np.bincount(train.labels.numpy()).min() > 5000


def write_idx(folder: Path, n_train=40, n_test=10, size=(28, 28), num_classes=10, gz=False, seed=0) -> Path:
    """The four files of MNIST's IDX format (big-endian header: magic 0x0803 / 0x0801, then the dimensions)."""
    import gzip

    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.randint(0, 256, (n, *size)).astype(np.uint8)
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            path = folder / f"{prefix}-{kind}-ubyte"
            with (gzip.open(path.with_name(path.name + ".gz"), "wb") if gz else open(path, "wb")) as f:
                f.write(header + arr.tobytes())
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_any_dataset_in_mnist_idx_format_by_name(tmp_path, gz):
    write_idx(tmp_path / "KMNIST" / "raw", n_train=30, num_classes=3, size=(16, 12), gz=gz)
    train = load_image_dataset("KMNIST", tmp_path, train=True)  # found in torchvision's <Name>/raw layout
    test = load_image_dataset("kmnist", tmp_path / "KMNIST" / "raw", train=False)
    assert train.dataset == test.dataset == "kmnist" and canonical_dataset_name("K-MNIST") == "kmnist"
    assert train.images.shape == (30, 1, 16, 12) and test.images.shape == (10, 1, 16, 12)
    assert train.num_classes == 3 and train.labels.tolist()[:4] == [0, 1, 2, 0]
    idx = balanced_split(train.labels.numpy(), 9, 0, num_classes=train.num_classes)
    for ext in (".npz", ".txt"):
        path = save_label_split(tmp_path / f"split{ext}", "kmnist", idx, train.labels.numpy()[idx], num_train=30)
        assert np.array_equal(load_label_split(path, train), idx)
    with pytest.raises(LabelSplitError, match="made for 'kmnist', not 'mnist'"):
        load_label_split(tmp_path / "split.npz", _data(n=30, dataset="mnist"))


def test_missing_or_wrong_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_image_dataset("CIFAR10", tmp_path)
    with pytest.raises(FileNotFoundError, match="no imagenet data .*MNIST's IDX format"):
        load_image_dataset("imagenet", tmp_path)
    for bad in ("my data", "../mnist", ""):
        with pytest.raises(ValueError, match="dataset must be MNIST, CIFAR10, SVHN or the name of a dataset"):
            load_image_dataset(bad, tmp_path)
    with pytest.raises(ValueError, match="uint8 of shape"):
        ImageData(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), "mnist")


# ----------------------------------------------------------------------------------------------- label splits
def test_balanced_split_is_balanced_and_reproducible():
    labels = np.random.RandomState(0).randint(0, 10, 5000)
    a, b = balanced_split(labels, 1000, 10), balanced_split(labels, 1000, 10)
    assert np.array_equal(a, b) and len(np.unique(a)) == 1000
    assert np.bincount(labels[a], minlength=10).tolist() == [100] * 10
    assert not np.array_equal(a, balanced_split(labels, 1000, 11))
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        balanced_split(labels, 105, 0)


def _data(n=200, dataset="svhn", seed=0):
    rng = np.random.RandomState(seed)
    shape = {"svhn": (3, 32, 32), "cifar10": (3, 32, 32), "mnist": (1, 28, 28)}[dataset]
    return ImageData(torch.from_numpy(rng.randint(0, 256, (n, *shape)).astype(np.uint8)),
                     torch.from_numpy(np.arange(n) % 10), dataset)


@pytest.mark.parametrize("dataset,ext", [("mnist", ".npz"), ("svhn", ".npz"), ("cifar10", ".txt")])
def test_label_split_roundtrip_in_original_layout(tmp_path, dataset, ext):
    data = _data(dataset=dataset)
    idx = balanced_split(data.labels.numpy(), 50, 10)
    path = label_split_path(tmp_path / "labels", dataset.upper(), 50, 10)
    assert path == tmp_path / "labels" / dataset / "50_balanced_labels" / f"10{ext}"
    save_label_split(path, dataset, idx, data.labels.numpy()[idx], seed=10, num_train=len(data))
    assert np.array_equal(load_label_split(path, data), idx)
    if ext == ".npz":  # the original's loader reads these two arrays
        with np.load(path) as z:
            assert np.array_equal(np.sort(np.concatenate([z["labeled_indices"], z["unlabeled_indices"]])),
                                  np.arange(len(data)))


def test_malformed_label_splits_rejected(tmp_path):
    data = _data()
    labels = data.labels.numpy()
    out_of_range = tmp_path / "oor.npz"
    np.savez(out_of_range, labeled_indices=np.array([0, 5, 400]))
    with pytest.raises(LabelSplitError, match=r"indices must be in \[0, 200\)"):
        load_label_split(out_of_range, data)
    dup = tmp_path / "dup.npz"
    np.savez(dup, labeled_indices=np.array([1, 1, 2]))
    with pytest.raises(LabelSplitError, match="duplicate"):
        load_label_split(dup, data)
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, idx=np.array([1, 2]))
    with pytest.raises(LabelSplitError, match="no 'labeled_indices'"):
        load_label_split(nokey, data)
    other = save_label_split(tmp_path / "mnist.npz", "mnist", [1, 2], labels[[1, 2]], num_train=200)
    with pytest.raises(LabelSplitError, match="made for 'mnist', not 'svhn'"):
        load_label_split(other, data)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, labeled_indices=np.array([1, 2]), labels=np.array([1, 7]))
    with pytest.raises(LabelSplitError, match="disagrees with the svhn labels"):
        load_label_split(wrong, data)
    cifar = _data(dataset="cifar10")
    bad_class = tmp_path / "c.txt"
    bad_class.write_text("3_cat.png cat\n4_seven.png seven\n")
    with pytest.raises(LabelSplitError, match="'seven' is not a cifar10 class"):
        load_label_split(bad_class, cifar)
    bad_line = tmp_path / "l.txt"
    bad_line.write_text("just-one-field\n")
    with pytest.raises(LabelSplitError, match="line 1"):
        load_label_split(bad_line, cifar)
    with pytest.raises(LabelSplitError, match="does not exist"):
        load_label_split(tmp_path / "none.npz", data)


# ----------------------------------------------------------------------------------------------- loader
def test_loader_epoch_is_one_pass_over_labeled_half_and_half():
    data = _data(n=200)
    idx = balanced_split(data.labels.numpy(), 40, 0)
    loader = SemiSupervisedLoader(data, idx, 16, seed=3)
    assert loader.steps_per_epoch == 5
    seen = []
    for step in range(1, 6):
        x, labels, x2 = loader.batch(step)
        assert x.shape == x2.shape == (16, 3, 32, 32) and x.dtype == torch.float32
        assert (labels[:8] >= 0).all() and (labels[8:] == -1).all()
        seen.append(labels[:8])
    assert torch.cat(seen).sort().values.tolist() == sorted(data.labels.numpy()[idx].tolist())
    a, b = loader.batch(7), loader.batch(7)
    assert all(torch.equal(u, v) for u, v in zip(a, b)), "a batch must be a pure function of the step"
    assert not torch.equal(loader.batch(1)[0], loader.batch(6)[0])
    it = SemiSupervisedLoader(data, idx, 16, seed=3, num_workers=2).batches_from(4)
    for step in (5, 6, 7):
        assert all(torch.equal(u, v) for u, v in zip(next(it), loader.batch(step)))


def test_loader_ranks_slice_the_same_global_batch():
    data = _data(n=200)
    idx = balanced_split(data.labels.numpy(), 40, 0)
    whole = SemiSupervisedLoader(data, idx, 16, seed=1).batch(3)
    parts = [SemiSupervisedLoader(data, idx, 16, seed=1, rank=r, world_size=2).batch(3) for r in range(2)]
    for k in range(3):
        lab = torch.cat([p[k][:4] for p in parts])
        unl = torch.cat([p[k][4:] for p in parts])
        assert torch.equal(torch.cat([lab, unl]), whole[k])
    with pytest.raises(ValueError, match="multiple of 2 x world size"):
        SemiSupervisedLoader(data, idx, 6, world_size=2)


def test_loader_soft_targets_travel_with_their_rows():
    """Image i is the constant i (mod 256) and its target row is one-hot at i % 7: without augmentation each batch
    row's target must be the one of the image in that row, on every rank's slice as in the whole batch."""
    n = 200
    images = torch.from_numpy(np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None],
                                              (n, 3, 32, 32)).copy())
    data = ImageData(images, torch.from_numpy(np.arange(n) % 10), "svhn")
    idx = balanced_split(data.labels.numpy(), 40, 0)
    targets = torch.nn.functional.one_hot(torch.arange(n) % 7, 7).float()
    loader = SemiSupervisedLoader(data, idx, 16, seed=2, augment_data=False, soft_targets=targets)
    for step in (1, 4, 9):
        x, labels, _, q = loader.batch(step)
        row_image = (x * 256).floor().long()[:, 0, 0, 0]
        assert torch.equal(q.argmax(1), row_image % 7) and q.shape == (16, 7)
        in_split = torch.isin(row_image, torch.as_tensor(np.asarray(idx)))  # n < 256: the image is its index
        assert torch.equal(in_split, labels >= 0)
    parts = [SemiSupervisedLoader(data, idx, 16, seed=2, augment_data=False, soft_targets=targets, rank=r,
                                  world_size=2).batch(3) for r in range(2)]
    whole = loader.batch(3)
    assert all(len(p) == 4 for p in parts)
    assert torch.equal(torch.cat([parts[0][3][:4], parts[1][3][:4], parts[0][3][4:], parts[1][3][4:]]), whole[3])
    with pytest.raises(ValueError, match="soft_targets must have shape"):
        SemiSupervisedLoader(data, idx, 16, soft_targets=targets[:10])


def test_augment_and_dequantize():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment(imgs, g, padding=0), imgs)
    out = augment(imgs, g, padding=2, flip=True)
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    # every output is a shifted (maybe flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(imgs, (2,) * 4)
    for i in range(5):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    x = dequantize(imgs, g)
    assert x.min() > 0 and x.max() < 1 and torch.equal((x * 256).floor().to(torch.uint8), imgs)
    ys = [y for _, y in eval_batches(_data(n=25), 10, rank=1, world_size=2)]
    assert [len(y) for y in ys] == [10]  # rank 1 of 2 gets batch 1 of 3


def test_prepare_data_cli_and_training_script_resume(tmp_path):
    """prepare_data on synthetic SVHN, then 2 steps of train_semisup_cons.py and a resumed 3rd step (with
    --invertible_backprop)."""
    write_svhn(tmp_path / "src", n_train=60, n_test=10)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(REPO / "experiments" / "prepare_data.py"), "--dataset", "SVHN", "--source",
                    str(tmp_path / "src"), "--out", str(tmp_path / "data"), "--num_labels", "20", "--seeds", "10"],
                   check=True, env=env, capture_output=True)
    split = tmp_path / "data" / "labels" / "svhn" / "20_balanced_labels" / "10.npz"
    assert split.exists() and (tmp_path / "data" / "images" / "svhn" / "train.npz").exists()
    common = [sys.executable, str(REPO / "experiments" / "train_semisup_cons.py"), "--dataset=SVHN",
              f"--data_path={tmp_path / 'data' / 'images' / 'svhn'}", f"--label_path={split}",
              f"--logdir={tmp_path / 'tb'}", f"--ckptdir={tmp_path / 'ck'}", "--mid_channels=4", "--num_blocks=1",
              "--num_scales=1", "--batch_size=8", "--device=cpu", "--backend=torch", "--log_freq=1"]
    r = subprocess.run(common + ["--max_steps=2"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test_acc" in r.stdout and '"steps": 2' in r.stdout
    # the memory mode is not part of the model: a run may continue with backprop by inversion
    r = subprocess.run(common + ["--max_steps=3", "--resume=auto", "--invertible_backprop"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and '"steps": 3, "steps_this_run": 1' in r.stdout
    assert "invertible backprop" in r.stdout
