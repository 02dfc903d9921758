"""KNNSpreading (flowgmm_fast.graph): the spreading against its closed form, clamping, fallbacks, bad input."""

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from flowgmm_fast.graph import KNNSpreading  # noqa: E402


def _problem(n=40, d=3, k_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    start = rng.dirichlet(np.ones(k_classes), size=n)
    labels = np.full(n, -1)
    labels[:k_classes * 2] = np.repeat(np.arange(k_classes), 2)
    return x, start, labels


def _dense_solution(x, start, labels, k, alpha, beta):
    """F = (1 - alpha) (I - alpha S)^-1 Y0 with S built densely from brute-force distances."""
    n = x.shape[0]
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    w = np.zeros((n, n))
    for i in range(n):
        w[i, np.argsort(dist[i], kind="stable")[:k]] = 1
    w = np.maximum(w, w.T)
    d = 1 / np.sqrt(w.sum(1))
    s = d[:, None] * w * d[None]
    y0 = beta * start.copy()
    lab = labels >= 0
    y0[lab] = 0
    y0[lab, labels[lab]] = 1
    f = (1 - alpha) * np.linalg.solve(np.eye(n) - alpha * s, y0)
    return f / f.sum(1, keepdims=True)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.1), (0.9, 1.0), (0.99, 0.0)])
def test_spreading_matches_the_closed_form(alpha, beta):
    x, start, labels = _problem()
    sp = KNNSpreading(n_neighbors=5, alpha=alpha, start_weight=beta, tol=1e-12, max_iter=100_000)
    sp.fit(x, start, labels)
    np.testing.assert_allclose(sp.distributions_, _dense_solution(x, start, labels, 5, alpha, beta), atol=1e-8)
    assert sp.n_iter_ > 1


def test_alpha_zero_keeps_the_start_and_clamps_the_labels():
    x, start, labels = _problem()
    sp = KNNSpreading(n_neighbors=4, alpha=0.0, start_weight=0.3).fit(x, start, labels)
    lab = labels >= 0
    np.testing.assert_allclose(sp.distributions_[~lab], start[~lab])
    np.testing.assert_array_equal(sp.distributions_[lab].argmax(1), labels[lab])
    np.testing.assert_allclose(sp.distributions_[lab].max(1), 1.0)


def test_predict_is_the_mean_of_the_nearest_training_rows():
    x, start, labels = _problem(n=30)
    sp = KNNSpreading(n_neighbors=3, alpha=0.8, start_weight=0.1).fit(x, start, labels)
    new = x[[4, 17]] + 1e-9
    expected = []
    for row in new:
        near = np.argsort(((x - row) ** 2).sum(1))[:3]
        expected.append(sp.distributions_[near].mean(0))
    np.testing.assert_allclose(sp.predict_proba(new), np.array(expected))
    assert sp.predict_proba(np.zeros((0, 3))).shape == (0, 3)


def test_duplicated_rows_and_an_unreached_component():
    # two far-apart clusters; only the first holds labels; start_weight 0 leaves the second with no mass
    x = np.concatenate([np.zeros((6, 2)), np.full((6, 2), 100.0)])
    x[:6, 0] = np.arange(6) * 0.01  # distinct rows in cluster 1; cluster 2 is 6 copies of one row
    start = np.tile([[0.2, 0.8]], (12, 1))
    labels = np.array([0, 1] + [-1] * 10)
    sp = KNNSpreading(n_neighbors=3, alpha=0.9, start_weight=0.0).fit(x, start, labels)
    np.testing.assert_allclose(sp.distributions_[6:], start[6:])  # fallback: the start distribution
    assert np.isfinite(sp.distributions_).all()
    np.testing.assert_allclose(sp.distributions_.sum(1), 1.0)


def test_state_round_trip():
    x, start, labels = _problem()
    sp = KNNSpreading(n_neighbors=5).fit(x, start, labels)
    sp2 = KNNSpreading.from_state(sp.state(), n_neighbors=5)
    np.testing.assert_array_equal(sp2.predict_proba(x[:7] + 0.01), sp.predict_proba(x[:7] + 0.01))


@pytest.mark.parametrize("kwargs,match", [({"n_neighbors": 0}, "n_neighbors"), ({"n_neighbors": 2.5}, "n_neighbors"),
                                          ({"alpha": 1.0}, "alpha"), ({"alpha": -0.1}, "alpha"),
                                          ({"start_weight": -1}, "start_weight"), ({"tol": 0}, "tol"),
                                          ({"max_iter": 0}, "max_iter")])
def test_bad_parameters_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        KNNSpreading(**kwargs)


def test_bad_input_names_what_is_wrong():
    x, start, labels = _problem()
    sp = KNNSpreading()
    with pytest.raises(ValueError, match="agree in n"):
        sp.fit(x[:-1], start, labels)
    bad = labels.copy()
    bad[0] = 3
    with pytest.raises(ValueError, match="labels"):
        sp.fit(x, start, bad)
    with pytest.raises(ValueError, match="at least 2 rows"):
        sp.fit(x[:1], start[:1], labels[:1])
    sp.fit(x, start, labels)
    with pytest.raises(ValueError, match="shape"):
        sp.predict_proba(x[:, :2])


def test_spread_labels_is_knn_spreading_without_a_start():
    from flowgmm_fast.graph import spread_labels

    x, start, labels = _problem()
    got = spread_labels(x, labels, 3, n_neighbors=5, alpha=0.9, tol=1e-12)
    np.testing.assert_allclose(got.distributions_, _dense_solution(x, start, labels, 5, 0.9, 0.0), atol=1e-8)
    # the labeled rows keep their class; the start distribution plays no part
    assert (got.distributions_[labels >= 0].argmax(1) == labels[labels >= 0]).all()
    np.testing.assert_allclose(got.predict_proba(x[:4]).sum(1), 1.0)


def test_pixel_pca_projects_scaled_pixels_on_the_training_images_components():
    from sklearn.decomposition import PCA

    from flowgmm_fast.graph import pixel_pca

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 1, 4, 4), dtype=np.uint8)
    test = rng.integers(0, 256, (5, 1, 4, 4), dtype=np.uint8)
    a, b = pixel_pca(train, [test], n_components=3, seed=0)
    pca = PCA(3, random_state=0).fit(train.reshape(30, -1) / 255.0)
    np.testing.assert_allclose(a, pca.transform(train.reshape(30, -1) / 255.0), atol=1e-5)
    np.testing.assert_allclose(b, pca.transform(test.reshape(5, -1) / 255.0), atol=1e-5)
    assert a.dtype == b.dtype == np.float32
    raw, = pixel_pca(train, n_components=0)
    np.testing.assert_allclose(raw, train.reshape(30, -1) / 255.0, atol=1e-7)
    with pytest.raises(ValueError, match="n_components must be at most 16"):
        pixel_pca(train, n_components=17)


def test_fold_predictions_are_plain_spreading_with_the_fold_hidden():
    from flowgmm_fast.graph import spread_labels

    x, start, labels = _problem(n=60, seed=3)
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 60)
    labels = np.where(rng.random(60) < 0.5, truth, -1)
    fitted = KNNSpreading(n_neighbors=5, alpha=0.9, start_weight=0.3).fit(x, start, labels)
    before = fitted.distributions_.copy()
    lab = np.flatnonzero(labels >= 0)
    folds = [lab[0::3], lab[1::3], lab[2::3]]
    expected = []
    for fold in folds:
        hidden = labels.copy()
        hidden[fold] = -1
        d = spread_labels(x, hidden, 3, n_neighbors=5, alpha=0.9).distributions_
        expected.append(d[fold].argmax(1))
    got = fitted.fold_predictions(labels, folds)
    np.testing.assert_array_equal(got, np.concatenate(expected))
    assert 0.3 < np.mean(got == labels[np.concatenate(folds)]) < 1.0  # neither trivial nor perfect here
    np.testing.assert_array_equal(fitted.distributions_, before)  # the fit is untouched
    # a row no remaining label reaches is -1: two far-apart pairs, the second pair's only label held out
    far = np.array([[0.0], [0.1], [100.0], [100.1]])
    two = KNNSpreading(n_neighbors=1).fit(far, np.full((4, 2), 0.5), np.array([0, -1, 1, -1]))
    np.testing.assert_array_equal(two.fold_predictions(np.array([0, -1, 1, -1]), [np.array([2])]), [-1])
    restored = KNNSpreading.from_state(fitted.state(), n_neighbors=5)
    with pytest.raises(RuntimeError, match="needs the graph of fit"):
        restored.fold_predictions(labels, folds)
    # release_graph frees the graph: the predictions stay, the folds need a new fit
    probs = fitted.predict_proba(x[:5])
    assert fitted.release_graph() is fitted and fitted._s is None
    np.testing.assert_array_equal(fitted.predict_proba(x[:5]), probs)
    with pytest.raises(RuntimeError, match="release_graph"):
        fitted.fold_predictions(labels, folds)
