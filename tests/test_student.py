"""LogisticStudent (flowgmm_fast/student.py): the estimator's distillation step."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from flowgmm_fast.student import LogisticStudent


def _problem(n=120, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    start = rng.dirichlet(np.ones(k), size=n)
    labels = np.full(n, -1)
    labels[: 3 * k] = np.arange(3 * k) % k
    return x, start, labels


@pytest.mark.parametrize("k", [2, 3])
def test_matches_a_weighted_logistic_regression_on_the_expanded_rows(k):
    x, start, labels = _problem(k=k)
    student = LogisticStudent(C=0.3, labeled_weight=4.0).fit(x, start, labels)
    lab, unl = labels >= 0, labels < 0
    xs = np.concatenate([x[lab]] + [x[unl]] * k)
    ys = np.concatenate([labels[lab]] + [np.full(unl.sum(), c) for c in range(k)])
    ws = np.concatenate([np.full(lab.sum(), 4.0)] + [start[unl, c] for c in range(k)])
    ref = LogisticRegression(C=0.3, max_iter=2000).fit(xs, ys, sample_weight=ws)
    x_new = np.random.default_rng(1).normal(size=(7, x.shape[1]))
    np.testing.assert_allclose(student.predict_proba(x_new), ref.predict_proba(x_new), atol=1e-10)
    # the labeled rows' weight matters: a different weight gives a different student
    other = LogisticStudent(C=0.3, labeled_weight=0.5).fit(x, start, labels)
    assert np.abs(other.predict_proba(x_new) - student.predict_proba(x_new)).max() > 1e-4


def test_state_round_trip_and_max_rows_subsample():
    x, start, labels = _problem(n=200)
    student = LogisticStudent(max_rows=90, seed=3).fit(x, start, labels)
    again = LogisticStudent(max_rows=90, seed=3).fit(x, start, labels)
    full = LogisticStudent().fit(x, start, labels)
    np.testing.assert_array_equal(student.coef_, again.coef_)  # the subset follows the seed
    assert np.abs(student.coef_ - full.coef_).max() > 1e-6  # 30 of the 191 unlabeled rows, not all of them
    restored = LogisticStudent.from_state(student.state(), n_classes=3, max_rows=90, seed=3)
    np.testing.assert_array_equal(restored.predict_proba(x), student.predict_proba(x))


def test_a_class_missing_from_the_targets_gets_probability_zero_and_one_class_answers_everywhere():
    x, start, labels = _problem(k=3)
    start[:, 2] = 0.0
    start /= start.sum(1, keepdims=True)
    labels[labels == 2] = -1
    proba = LogisticStudent().fit(x, start, labels).predict_proba(x)
    assert proba.shape == (x.shape[0], 3) and np.all(proba[:, 2] == 0) and np.allclose(proba.sum(1), 1)
    only = np.zeros_like(start)
    only[:, 1] = 1.0
    one = LogisticStudent().fit(x, only, np.full(x.shape[0], -1)).predict_proba(x[:5])
    np.testing.assert_array_equal(one, np.tile([0.0, 1.0, 0.0], (5, 1)))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: LogisticStudent(C=0.0), ValueError, "C"),
    (lambda: LogisticStudent(labeled_weight=-1.0), ValueError, "labeled_weight"),
    (lambda: LogisticStudent(max_rows=0), ValueError, "max_rows"),
    (lambda: LogisticStudent().fit(np.zeros((4, 2)), np.full((3, 2), 0.5), np.full(4, -1)), ValueError, "agree"),
    (lambda: LogisticStudent().fit(np.zeros((4, 2)), np.full((4, 2), 0.5), np.array([0, 2, -1, -1])), ValueError,
     "labels"),
    (lambda: LogisticStudent().fit(*_problem()[:3]).predict_proba(np.zeros((2, 5))), ValueError, "shape"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
