"""Tabular data: balanced splits, standardisation, npz/CSV/split files, and the MiniBooNE / HEPMASS loaders on tiny
synthetic files written in the standard UCI formats (no copy of the real data exists here)."""

import numpy as np
import pytest

from flowgmm_fast.data import tabular as T


def test_balanced_labeled_indices_balanced_distinct_and_seeded():
    y = np.repeat(np.arange(4), [30, 10, 50, 7])
    idx = T.balanced_labeled_indices(y, 20, seed=3)
    assert idx.dtype == np.int64 and idx.size == 20 and np.unique(idx).size == 20
    assert np.all(np.bincount(y[idx], minlength=4) == 5)
    assert np.array_equal(idx, T.balanced_labeled_indices(y, 20, seed=3))
    assert not np.array_equal(idx, T.balanced_labeled_indices(y, 20, seed=4))


@pytest.mark.parametrize("num", [0, 3, -4, 2.0])
def test_balanced_labeled_indices_rejects_bad_count(num):
    with pytest.raises(ValueError, match="num_labeled"):
        T.balanced_labeled_indices(np.array([0, 1, 0, 1]), num)


def test_balanced_labeled_indices_class_too_small():
    with pytest.raises(ValueError, match="class 1 has 1 points"):
        T.balanced_labeled_indices(np.array([0, 0, 0, 1]), 4)


def test_semisup_labels():
    y = np.array([2, 0, 1, 1, 0])
    out = T.semisup_labels(y, [1, 3])
    assert out.tolist() == [-1, 0, -1, 1, -1]
    with pytest.raises(ValueError, match="labeled_idx"):
        T.semisup_labels(y, [7])


def test_standardizer_constant_feature_and_inverse():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(5, 3, (200, 2)), np.full((200, 1), 7.0)], 1)
    st = T.Standardizer.fit(x)
    z = st.transform(x)
    assert np.allclose(z.mean(0), 0, atol=1e-5) and np.allclose(z[:, :2].std(0), 1, atol=1e-5)
    assert np.all(z[:, 2] == 0)
    assert np.allclose(st.inverse(z), x, atol=1e-4)
    with pytest.raises(ValueError, match="3 features"):
        st.transform(x[:, :2])


def test_features_npz_and_csv_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 3)).astype(np.float32), rng.integers(0, 3, 12)
    T.save_features(str(tmp_path / "f.npz"), x, y, x[:4], y[:4])
    xr, yr, xt, yt = T.load_features(str(tmp_path / "f.npz"))
    assert np.array_equal(xr, x) and np.array_equal(yr, y) and np.array_equal(xt, x[:4]) and np.array_equal(yt, y[:4])
    csv = tmp_path / "f.csv"
    with open(csv, "w") as f:
        f.write("a,label,b,c\n")
        for row, lab in zip(x, y):
            f.write(f"{row[0]},{lab},{row[1]},{row[2]}\n")
    xc, yc, xt, _ = T.load_features(str(csv), label_column="label")
    assert xt is None and np.allclose(xc, x, atol=1e-6) and np.array_equal(yc, y)
    xc2, yc2, _, _ = T.load_features(str(csv), label_column=1)
    assert np.array_equal(xc2, xc) and np.array_equal(yc2, yc)
    with pytest.raises(ValueError, match="label_column 'nope'"):
        T.load_features(str(csv), label_column="nope")
    (tmp_path / "f.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match=".npz or .csv"):
        T.load_features(str(tmp_path / "f.txt"))
    with pytest.raises(FileNotFoundError):
        T.load_features(str(tmp_path / "missing.npz"))


def test_split_files(tmp_path):
    for name in ("s.npz", "s.txt"):
        T.save_split(str(tmp_path / name), [5, 1, 3])
        assert T.load_split(str(tmp_path / name), num_train=6).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="indices must lie in"):
        T.load_split(str(tmp_path / "s.txt"), num_train=4)
    (tmp_path / "dup.txt").write_text("1\n1\n")
    with pytest.raises(ValueError, match="distinct"):
        T.load_split(str(tmp_path / "dup.txt"))


def test_maf_discrete_columns_uses_smallest_value_count():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    x[:10, 1] = -999.0          # fill value repeated 10 times: dropped
    x[:, 2] = np.round(x[:, 2])  # discrete: its smallest value repeats? only if > 5 times
    x[:6, 3] = x[:, 3].min() - 1  # smallest value repeated 6 times: dropped
    drop = T.maf_discrete_columns(x).tolist()
    assert 1 in drop and 3 in drop and 0 not in drop


def _write_miniboone(root, n_sig=40, n_bkg=60, n_feat=50, seed=0):
    rng = np.random.default_rng(seed)
    sig = rng.normal(1.0, 1.0, (n_sig, n_feat))
    bkg = rng.normal(-1.0, 1.0, (n_bkg, n_feat))
    data = np.concatenate([sig, bkg])
    data[3, :] = -999.0           # an outlier row (first feature < -100): removed
    data[:, 7] = np.where(np.arange(len(data)) < 20, 0.0, data[:, 7] + 5)  # smallest value 0.0 x20: column removed
    with open(root / T.MINIBOONE_FILE, "w") as f:
        f.write(f"   {n_sig}   {n_bkg}\n")
        for row in data:
            f.write(" ".join(f"{v: .6E}" for v in row) + "\n")
    return data


def test_load_miniboone_on_synthetic_file(tmp_path):
    _write_miniboone(tmp_path)
    d = T.load_miniboone(str(tmp_path), test_fraction=0.2, seed=0)
    assert d.dim == 49                      # 50 minus column 7 (its smallest value repeats 20 times)
    n = d.x_train.shape[0] + d.x_test.shape[0]
    assert n == 99                           # one outlier row removed
    assert d.num_classes == 2 and set(np.unique(d.y_train)) == {0, 1}
    assert abs(d.x_test.shape[0] - 20) <= 1
    assert np.allclose(d.x_train.mean(0), 0, atol=1e-5) and np.allclose(d.x_train.std(0), 1, atol=1e-4)
    # signal rows have the larger raw mean: labels must follow rows, not be shuffled apart
    assert d.x_train[d.y_train == 1].mean() > d.x_train[d.y_train == 0].mean()


def test_load_miniboone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="MiniBooNE_PID.txt"):
        T.load_miniboone(str(tmp_path))
    (tmp_path / T.MINIBOONE_FILE).write_text("  3  2\n1 2\n3 4\n")
    with pytest.raises(ValueError, match="announces 5 rows"):
        T.load_miniboone(str(tmp_path))


def _write_hepmass(root, n_train=80, n_test=40, seed=0, trailing_comma_test=True):
    rng = np.random.default_rng(seed)
    header = "# label," + ",".join(f"f{i}" for i in range(27)) + ",mass"
    masses = np.array([500.0, 750.0, 1000.0, 1250.0, 1500.0])
    for name, n, trailing in ((T.HEPMASS_FILES[0], n_train, False), (T.HEPMASS_FILES[1], n_test, trailing_comma_test)):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 27)) + y[:, None] * 0.8
        x[:, 5] = rng.choice([-1.0, 1.0], n)  # a discrete feature: dropped by the MAF rule
        mass = rng.choice(masses, n)
        with open(root / name, "w") as f:
            f.write(header + "\n")
            for lab, row, m in zip(y, x, mass):
                f.write(f"{lab:.1f}," + ",".join(f"{v:.6f}" for v in row) + f",{m:.1f}" + ("," if trailing else "")
                        + "\n")


def test_load_hepmass_on_synthetic_files(tmp_path):
    _write_hepmass(tmp_path)
    d = T.load_hepmass(str(tmp_path))
    assert d.dim == 26                       # 27 features + mass, minus mass and the discrete f5
    assert d.x_train.shape == (80, 26) and d.x_test.shape == (40, 26)
    assert set(np.unique(d.y_train)) <= {0, 1}
    assert np.allclose(d.x_train.mean(0), 0, atol=1e-5)
    assert d.x_train[d.y_train == 1].mean() > d.x_train[d.y_train == 0].mean()
    small = T.load_hepmass(str(tmp_path), max_train=30, max_test=10)
    assert small.x_train.shape[0] == 30 and small.x_test.shape[0] == 10


def test_load_hepmass_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="1000_train.csv"):
        T.load_hepmass(str(tmp_path))


@pytest.mark.parametrize("name,dim,k", [("digits", 64, 10), ("breast_cancer", 30, 2)])
def test_load_sklearn(name, dim, k):
    pytest.importorskip("sklearn")
    d = T.load_sklearn(name, test_fraction=0.3, seed=0)
    assert d.dim == dim and d.num_classes == k and d.scaler is not None
    assert np.allclose(d.x_train.mean(0), 0, atol=1e-4)
    with pytest.raises(ValueError, match="'digits' or 'breast_cancer'"):
        T.load_sklearn("iris")


def test_load_hepmass_bad_row(tmp_path):
    _write_hepmass(tmp_path, n_train=10, n_test=5)
    with open(tmp_path / T.HEPMASS_FILES[0], "a") as f:
        f.write("1.0,abc" + ",0" * 27 + "\n")
    with pytest.raises(ValueError, match="numeric comma-separated"):
        T.load_hepmass(str(tmp_path))
