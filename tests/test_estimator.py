"""FlowGMMClassifier: the scikit-learn contract, semi-supervised behaviour, bad input, persistence and pickling.

Small budgets everywhere (``FAST``): these test the contract and the mechanics; the accuracy of the defaults is
measured by experiments/tabular_benchmark.py (experiments/RESULTS.md), not here.
"""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

from flowgmm_fast import FlowGMMClassifier
from flowgmm_fast.data.tabular import labels_per_class
from flowgmm_fast.estimator import unlabeled_mask
from flowgmm_fast.student import LogisticStudent

FAST = dict(n_estimators=1, max_epochs=20, random_state=0)

# Checks that cannot apply to a semi-supervised estimator, with the reason (scikit-learn's own semi-supervised
# estimators are exempted from the same check by name inside scikit-learn).
EXPECTED_FAILED_CHECKS = {
    "check_classifiers_classes": "its last case uses the class labels [-1, 1], and -1 marks an unlabeled row in "
                                 "scikit-learn's semi-supervised convention: only one labeled class remains",
}


@parametrize_with_checks([FlowGMMClassifier(**FAST)], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def _blobs(n=300, k=3, d=4, seed=0, sep=4.0, weights=None):
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=weights)
    centers = rng.normal(size=(k, d)) * sep
    return centers[y] + rng.normal(size=(n, d)), y


def _semi(y, per_class=5, seed=0):
    out = np.full(y.shape, -1, dtype=np.int64)
    idx = labels_per_class(y, per_class, seed=seed)
    out[idx] = y[idx]
    return out


def test_fits_semi_supervised_with_any_label_values():
    x, y = _blobs()
    ys = _semi(y)
    names = np.array(["setosa", "versicolor", "virginica"])
    for labels, classes in ((ys, np.arange(3)), (np.where(ys >= 0, ys * 10 + 7, -1), np.array([7, 17, 27])),
                            (np.where(ys >= 0, names[ys.clip(0)], "-1").astype(object), names)):
        clf = FlowGMMClassifier(**FAST).fit(x, labels)
        np.testing.assert_array_equal(clf.classes_, classes)
        assert clf.score(x, classes[y]) > 0.9
        proba = clf.predict_proba(x)
        assert proba.shape == (len(x), 3)
        np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
        np.testing.assert_array_equal(clf.predict(x), clf.classes_[proba.argmax(1)])
    assert clf.n_features_in_ == 4 and clf.n_coupling_layers_ == 4


def test_unlabeled_mask_rules():
    np.testing.assert_array_equal(unlabeled_mask(np.array([0, -1, 2])), [False, True, False])
    np.testing.assert_array_equal(unlabeled_mask(np.array(["a", "", "-1", "b"], dtype=object)),
                                  [False, True, True, False])
    np.testing.assert_array_equal(unlabeled_mask(np.array(["a", None, -1], dtype=object)), [False, True, True])


def test_learned_class_prior_follows_the_unlabeled_rows():
    """Balanced labels on 80/20 data: the EM-learned prior finds the imbalance, a uniform prior does not."""
    x, y = _blobs(n=1000, k=2, d=3, seed=1, sep=3.0, weights=[0.8, 0.2])
    ys = _semi(y, per_class=10)
    learned = FlowGMMClassifier(**FAST).fit(x, ys)
    assert abs(learned.class_prior_[0] - np.mean(y == 0)) < 0.05
    uniform = FlowGMMClassifier(**FAST, class_prior="uniform").fit(x, ys)
    np.testing.assert_allclose(uniform.class_prior_, [0.5, 0.5])
    fixed = FlowGMMClassifier(**FAST, class_prior={0: 3.0, 1: 1.0}).fit(x, ys)
    np.testing.assert_allclose(fixed.class_prior_, [0.75, 0.25], atol=1e-6)


def test_labels_only_and_explicit_sizes():
    x, y = _blobs()
    clf = FlowGMMClassifier(**FAST, unlabeled_weight=0.0, n_coupling_layers=0).fit(x, _semi(y))
    assert clf.n_coupling_layers_ == 0 and clf.score(x, y) > 0.9
    assert FlowGMMClassifier().architecture(200, 10) == {"num_coupling_layers": 4, "hidden_dim": 16}
    assert FlowGMMClassifier().architecture(100_000, 10)["hidden_dim"] == 128
    assert FlowGMMClassifier().architecture(200_000, 10)["hidden_dim"] == 256
    assert FlowGMMClassifier().architecture(10**7, 10)["hidden_dim"] == 256
    assert FlowGMMClassifier().architecture(500, 1)["num_coupling_layers"] == 0


def test_score_samples_flags_outliers_and_sample_draws_rows():
    x, y = _blobs(n=400, d=3)
    clf = FlowGMMClassifier(**FAST).fit(x, _semi(y))
    inlier = clf.score_samples(x[:50])
    outlier = clf.score_samples(x[:50] + 40.0)
    assert inlier.shape == (50,) and np.all(np.isfinite(inlier)) and np.median(outlier) < np.median(inlier)
    s = clf.sample(20, class_label=1, random_state=0)
    assert s.shape == (20, 3) and np.all(np.isfinite(s))
    assert np.mean(clf.predict(s) == 1) > 0.8
    np.testing.assert_array_equal(s, clf.sample(20, class_label=1, random_state=0))
    assert clf.sample(5).shape == (5, 3)


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN"), ("inf", "infinity"), ("width", "features"), ("no_labels", "no labeled row"),
    ("one_class", "single class"), ("prior_unknown", "never seen"), ("prior_missing", "no weight"),
    ("prior_shape", "one weight per class"), ("prior_negative", "> 0"), ("sample_label", "class_label"),
    ("sample_n", "n_samples"), ("param", "n_estimators"), ("device", "device"), ("regression", "Unknown label type"),
])
def test_bad_input_gets_a_clear_error(case, match):
    x, y = _blobs(n=120)
    ys = _semi(y)
    fitted = FlowGMMClassifier(**FAST).fit(x, ys) if case in ("width", "sample_label", "sample_n") else None
    with pytest.raises(ValueError, match=match):
        if case == "nan":
            FlowGMMClassifier(**FAST).fit(np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), ys)
        elif case == "inf":
            FlowGMMClassifier(**FAST).fit(np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x), ys)
        elif case == "width":
            fitted.predict(x[:, :3])
        elif case == "no_labels":
            FlowGMMClassifier(**FAST).fit(x, np.full_like(ys, -1))
        elif case == "one_class":
            FlowGMMClassifier(**FAST).fit(x, np.where(ys == 1, 1, -1))
        elif case == "prior_unknown":
            FlowGMMClassifier(**FAST, class_prior={0: 1, 1: 1, 2: 1, 5: 1}).fit(x, ys)
        elif case == "prior_missing":
            FlowGMMClassifier(**FAST, class_prior={0: 1, 1: 1}).fit(x, ys)
        elif case == "prior_shape":
            FlowGMMClassifier(**FAST, class_prior=[0.5, 0.5]).fit(x, ys)
        elif case == "prior_negative":
            FlowGMMClassifier(**FAST, class_prior=[0.5, 0.6, -0.1]).fit(x, ys)
        elif case == "sample_label":
            fitted.sample(3, class_label=99)
        elif case == "sample_n":
            fitted.sample(0)
        elif case == "param":
            FlowGMMClassifier(n_estimators=0).fit(x, ys)
        elif case == "device":
            FlowGMMClassifier(**FAST, device="quantum").fit(x, ys)
        elif case == "regression":
            FlowGMMClassifier(**FAST).fit(x, np.where(ys >= 0, ys + 0.5, -1))


def test_pipeline_clone_cross_validation_and_pickle(tmp_path):
    x, y = _blobs(n=240)
    ys = _semi(y)
    pipe = make_pipeline(FunctionTransformer(lambda a: a * 2.0 + 1.0), FlowGMMClassifier(**FAST))
    pipe.fit(x, ys)
    # the quantile preprocessing ignores monotone per-column maps: the pipeline predicts what the bare model does
    np.testing.assert_array_equal(pipe.predict_proba(x), FlowGMMClassifier(**FAST).fit(x, ys).predict_proba(x))
    assert pipe.score(x, y) > 0.85
    twin = clone(pipe.steps[-1][1])
    assert twin.get_params() == pipe.steps[-1][1].get_params() and not hasattr(twin, "classes_")
    scores = cross_val_score(FlowGMMClassifier(**FAST), x, y, cv=3)  # fully labeled folds work too
    assert scores.mean() > 0.9
    clf = FlowGMMClassifier(**FAST).fit(x, ys)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(x), clf.predict_proba(x))
    import joblib

    joblib.dump(clf, tmp_path / "clf.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "clf.joblib").predict_proba(x), clf.predict_proba(x))


def test_fit_is_reproducible_and_seeded():
    x, y = _blobs(n=200)
    ys = _semi(y)
    a = FlowGMMClassifier(**FAST).fit(x, ys).predict_proba(x)
    b = FlowGMMClassifier(**FAST).fit(x, ys).predict_proba(x)
    c = FlowGMMClassifier(**{**FAST, "random_state": 1}).fit(x, ys).predict_proba(x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_save_load_gives_identical_predictions_in_a_fresh_process(tmp_path):
    x, y = _blobs(n=200)
    ys = _semi(y)
    names = np.array(["a", "b", "c"])
    labels = np.where(ys >= 0, names[ys.clip(0)], "")
    clf = FlowGMMClassifier(**{**FAST, "n_estimators": 2}).fit(x, labels)
    path = clf.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.safetensors"]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", clf.predict_proba(x))
    code = (f"import numpy as np; from flowgmm_fast import FlowGMMClassifier as C; "
            f"m = C.load({str(path)!r}); x = np.load({str(tmp_path / 'x.npy')!r}); "
            f"assert np.array_equal(m.predict_proba(x), np.load({str(tmp_path / 'expected.npy')!r})); "
            f"assert list(m.classes_) == ['a', 'b', 'c']; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    clf.save(path)  # replacing a saved model is allowed and atomic
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing"):
        clf.save(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        FlowGMMClassifier.load(tmp_path / "other")


def test_labels_per_class_draws_up_to_n_per_class():
    y = np.array([0] * 50 + [1] * 3 + [2] * 20)
    idx = labels_per_class(y, 10, seed=0)
    assert np.bincount(y[idx]).tolist() == [10, 3, 10]
    np.testing.assert_array_equal(idx, labels_per_class(y, 10, seed=0))
    with pytest.raises(ValueError, match="per_class"):
        labels_per_class(y, 0)
    with pytest.raises(ValueError, match="true class labels"):
        labels_per_class(np.array([0, -1, 1]), 1)


def test_invertible_backprop_fits_the_same_model():
    """invertible_backprop=True reaches the flows (RealNVPTabular) and trains the model standard autograd trains, up
    to float32 rounding (backprop by inversion gives the same gradients; dropout masks are replayed)."""
    x, y = _blobs(n=200)
    ys = _semi(y)
    std = FlowGMMClassifier(**{**FAST, "max_epochs": 5}).fit(x, ys)
    inv = FlowGMMClassifier(**{**FAST, "max_epochs": 5, "invertible_backprop": True}).fit(x, ys)
    assert inv.estimators_[0].flow.invertible_backprop and not std.estimators_[0].flow.invertible_backprop
    assert inv.n_iter_ == std.n_iter_
    np.testing.assert_allclose(inv.flow_proba(x), std.flow_proba(x), atol=1e-4)
    with pytest.raises(ValueError, match="invertible_backprop"):
        FlowGMMClassifier(invertible_backprop="yes").fit(x, ys)


def test_equal_label_weight_is_the_batch_over_labeled_ratio():
    # "equal" weighs the labeled rows' mean NLL like a batch's unlabeled mean: the same fit as a per-row weight of
    # batch / n_labeled, and a different one from the joint likelihood (label_weight=1) on this few-label table
    x, y = _blobs(n=200)
    ys = _semi(y, per_class=3)
    params = dict(FAST, max_epochs=5, batch_size=50)
    equal = FlowGMMClassifier(label_weight="equal", **params).fit(x, ys)
    ratio = FlowGMMClassifier(label_weight=50 / 9, **params).fit(x, ys)
    joint = FlowGMMClassifier(**params).fit(x, ys)
    np.testing.assert_allclose(equal.flow_proba(x), ratio.flow_proba(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(equal.flow_proba(x), joint.flow_proba(x), atol=1e-4)
    with pytest.raises(ValueError, match="label_weight"):
        FlowGMMClassifier(label_weight="joint", **FAST).fit(x, ys)


def test_graph_step_spreads_the_flows_posteriors_and_fit_graph_adds_it_without_retraining():
    x, y = _blobs(n=200)
    ys = _semi(y)
    plain = FlowGMMClassifier(**{**FAST, "n_neighbors": 0, "distill": False}).fit(x, ys)
    graph = FlowGMMClassifier(**{**FAST, "n_neighbors": 7, "distill": False}).fit(x, ys)
    assert plain.spreading_ is None and graph.spreading_ is not None and graph.student_ is None
    # the training does not depend on the graph; without any step the prediction is the flow's posteriors
    np.testing.assert_array_equal(graph.flow_proba(x), plain.flow_proba(x))
    np.testing.assert_array_equal(plain.predict_proba(x), plain.flow_proba(x))
    proba = graph.predict_proba(x)
    assert not np.allclose(proba, graph.flow_proba(x))
    np.testing.assert_array_equal(proba, graph.spreading_.predict_proba(graph.preprocessor_.transform(x)))
    np.testing.assert_allclose(proba.sum(1), 1.0)
    # the start is the flow's posterior over the training rows, the labeled rows clamped to their labels
    lab = ys >= 0
    assert (graph.spreading_.distributions_[lab].argmax(1) == ys[lab]).all()
    # fit_graph on the plain model gives exactly the n_neighbors=7 model; n_neighbors=0 removes it again
    np.testing.assert_array_equal(plain.set_params(n_neighbors=7).fit_graph(x, ys).predict_proba(x), proba)
    np.testing.assert_array_equal(plain.set_params(n_neighbors=0).fit_graph(x, ys).predict_proba(x),
                                  plain.flow_proba(x))
    # the graph travels with the model (pickle and save/load share one path), with the k it was built with
    graph.set_params(n_neighbors=3)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(graph)).predict_proba(x), proba)
    with pytest.raises(ValueError, match="not fitted on"):
        plain.fit_graph(x, np.where(ys == 2, 5, ys))
    with pytest.raises(ValueError, match="one entry per row"):
        plain.fit_graph(x, ys[:-1])
    for bad in ({"n_neighbors": -1}, {"spreading_alpha": 1.0}, {"spreading_start": -0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FlowGMMClassifier(**{**FAST, **bad}).fit(x, ys)


def test_default_prediction_weighs_the_graph_and_the_student_which_travel_with_the_model(tmp_path):
    # two rings: a graph recovers held-out labels, a linear boundary cannot, so the graph takes the weight
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    angle = rng.uniform(0, 2 * np.pi, 200)
    x = (1 + 2 * y)[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.1 * rng.normal(size=(200, 2))
    ys = _semi(y)
    clf = FlowGMMClassifier(**FAST).fit(x, ys)  # defaults: n_neighbors=7, distill=True, graph_weight="auto"
    assert clf.spreading_ is not None and clf.student_ is not None
    assert clf.spreading_._s is None  # the graph is freed once the weight's folds are done
    q = clf.preprocessor_.transform(x)
    proba = clf.predict_proba(x)
    w = clf.graph_weight_
    np.testing.assert_allclose(proba, w * clf.spreading_.predict_proba(q) + (1 - w) * clf.student_.predict_proba(q),
                               rtol=0, atol=1e-12)
    # the default graph step (spreading_start=0) is plain label spreading of the labels: the step the folds measure
    from flowgmm_fast.graph import spread_labels

    plain = spread_labels(clf.spreading_.x_, ys, 2, n_neighbors=7, alpha=0.9)
    np.testing.assert_allclose(clf.spreading_.distributions_, plain.distributions_, rtol=0, atol=1e-12)
    # the weight follows the held-out labeled rows only one of the two recovers (5 per class: 5 folds)
    scores = clf.step_scores_
    b, c = scores["only_graph"], scores["only_linear"]
    assert scores["folds"] == 5 and scores["graph"] - scores["linear"] == pytest.approx((b - c) / 10)
    d = (b - c) / 10
    assert w == pytest.approx(float(np.clip(0.5 + np.sign(d) * max(abs(d) - np.sqrt(b + c) / 10, 0) / 0.2, 0, 1)))
    assert b - c >= 3 and w > 0.5
    assert w == pytest.approx(float(np.clip(0.5 + (scores["graph"] - scores["linear"]) / 0.2, 0, 1)))
    # the student is fitted to the flow's posteriors on the training rows (labeled rows with their labels)
    student = LogisticStudent(C=0.1, labeled_weight=5.0).fit(q, clf.flow_proba(x), ys)
    np.testing.assert_allclose(clf.student_.predict_proba(q), student.predict_proba(q), atol=1e-12)
    # each step alone, from the same flows (fit_graph rebuilds the steps without retraining)
    only_student = pickle.loads(pickle.dumps(clf)).set_params(n_neighbors=0).fit_graph(x, ys)
    assert only_student.spreading_ is None and only_student.graph_weight_ is None
    np.testing.assert_allclose(only_student.predict_proba(x), clf.student_.predict_proba(q), atol=1e-12)
    # a fixed weight: 0.5 is the mean of the two steps, 1 the graph alone
    mean = pickle.loads(pickle.dumps(clf)).set_params(graph_weight=0.5).fit_graph(x, ys)
    np.testing.assert_allclose(mean.predict_proba(x), (clf.spreading_.predict_proba(q)
                                                       + clf.student_.predict_proba(q)) / 2, atol=1e-12)
    graph = pickle.loads(pickle.dumps(clf)).set_params(graph_weight=1).fit_graph(x, ys)
    np.testing.assert_allclose(graph.predict_proba(x), clf.spreading_.predict_proba(q), atol=1e-12)
    # save/load (no pickle) and pickle give the same probabilities, with the steps and weight the model was fitted with
    clf.save(tmp_path / "m")
    loaded = FlowGMMClassifier.load(tmp_path / "m")
    assert loaded.graph_weight_ == w and loaded.step_scores_ == scores
    np.testing.assert_array_equal(loaded.predict_proba(x), proba)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).predict_proba(x), proba)
    # a folder saved before the weights existed predicts with the mean, as it did
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["graph_weight"], config["step_scores"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    np.testing.assert_allclose(FlowGMMClassifier.load(tmp_path / "m").predict_proba(x), mean.predict_proba(x),
                               atol=1e-12)
    with pytest.raises(ValueError, match="graph_weight"):
        FlowGMMClassifier(**{**FAST, "graph_weight": 1.5}).fit(x, ys)
    with pytest.raises(ValueError, match="distill"):
        FlowGMMClassifier(**{**FAST, "distill": "yes"}).fit(x, ys)

