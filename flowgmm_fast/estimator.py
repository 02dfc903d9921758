"""FlowGMMClassifier: semi-supervised FlowGMM as a scikit-learn estimator for tables.

    from flowgmm_fast import FlowGMMClassifier
    clf = FlowGMMClassifier().fit(X, y)        # y == -1 marks unlabeled rows (scikit-learn's semi-supervised rule)
    clf.predict(X_new); clf.predict_proba(X_new); clf.score_samples(X_new); clf.sample(5, class_label="spam")
    clf.save("model/");  FlowGMMClassifier.load("model/")

What ``fit`` does, with no per-table tuning (each choice measured against the baselines on several real tables:
experiments/RESULTS.md, "FlowGMMClassifier"):
1. Preprocessing fitted on every row, labeled or not (:class:`~flowgmm_fast.preprocessing.QuantileGaussianizer`):
   each column through its empirical CDF to a standard normal, tied values (discrete columns) dequantised by a
   uniform draw inside their CDF interval anew at every training step, outliers clipped, constant columns dropped.
2. ``n_estimators`` FlowGMM models, each a RealNVPTabular flow (size from the number of rows and columns, see
   :meth:`FlowGMMClassifier.architecture`) and a Gaussian mixture with one component per class whose means start at
   the labeled class means; each member trains on its own seed and its own held-out slice of unlabeled rows.
3. Training (:func:`flowgmm_fast.semisup.fit_flowgmm`, the library's one tabular loop): the FlowGMM objective;
   at every epoch end an EM step of the class priors from the unlabeled rows' responsibilities
   (``class_prior="learn"``), and early stopping on the held-out NLL (needs no labels).
4. Prediction: the members' class posteriors p(y | x), including the learned priors, averaged (FlowGMM's own
   answer, :meth:`FlowGMMClassifier.flow_proba`), then two steps fitted on the training rows, whose probabilities
   are combined: (a) ``n_neighbors`` > 0: label spreading along a k-nearest-neighbour
   graph of the preprocessed training rows (:class:`~flowgmm_fast.graph.KNNSpreading`, labeled rows clamped; by
   default plain spreading of the labels, ``spreading_start`` > 0 also starts the unlabeled rows from FlowGMM's
   posteriors; a new row gets the mean spread distribution of its nearest training rows);
   (b) ``distill``: a regularised logistic regression fitted to the labeled rows and to FlowGMM's posteriors on the
   unlabeled rows as soft targets (:class:`~flowgmm_fast.student.LogisticStudent`). With neither, FlowGMM's
   posteriors are the prediction. With both, their weights (``graph_weight="auto"``) come from the labeled rows:
   a stratified K-fold over them measures how well plain label spreading on the graph and a logistic regression on
   the labeled rows each recover held-out labels (neither uses FlowGMM's posteriors, which saw every label); equal
   accuracies give the mean, and the graph's weight moves linearly with their difference less its standard error,
   to 1 (or 0) at WEIGHT_MARGIN.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._version import __version__
from .graph import KNNSpreading
from .model import FlowGMM
from .preprocessing import QuantileGaussianizer
from .semisup import FitConfig, build_tabular_flowgmm, fit_flowgmm, init_means_from_labeled, init_std_from_labeled
from .student import LogisticStudent

__all__ = ["FlowGMMClassifier", "unlabeled_mask"]

FORMAT_VERSION = 1
# graph_weight="auto": folds over the labeled rows (fewer when a class has fewer labels; none below 2 per class:
# the mean), the regularisation of the fold's logistic regression (the student's C 0.1 x its labeled weight 5), and
# the difference of fold accuracies at which one step takes all the weight (fixed a priori, not tuned on a table)
WEIGHT_FOLDS = 5
WEIGHT_LR_C = 0.5
WEIGHT_MARGIN = 0.1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def unlabeled_mask(y) -> np.ndarray:
    """Boolean mask of the unlabeled entries of a semi-supervised target: -1 in a numeric ``y``; -1, "-1", "" or
    None in a string / object ``y`` (the CSV reader's empty cell)."""
    y = np.asarray(y)
    if y.dtype.kind in "iu":
        return y == -1
    if y.dtype.kind == "f":
        return y == -1.0
    if y.dtype.kind == "b":
        return np.zeros(y.shape, bool)
    out = np.zeros(y.shape, bool)
    for i, v in enumerate(y.ravel()):
        out.flat[i] = v is None or (isinstance(v, str) and v.strip() in ("", "-1")) or (
            isinstance(v, numbers.Number) and not isinstance(v, bool) and v == -1)
    return out


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:<index>' or 'auto', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu' or 'auto'")
    return dev


class FlowGMMClassifier(ClassifierMixin, BaseEstimator):
    """Semi-supervised classification with FlowGMM (Izmailov et al., ICML 2020), for feature tables.

    Parameters
    ----------
    n_estimators : int, default=5
        FlowGMM models averaged (different seeds and held-out slices); more is steadier and slower.
    n_coupling_layers, hidden_dim : int or "auto", default="auto"
        Flow size: coupling layers and the width of their s/t MLPs. "auto" sizes them from the rows and columns of
        the table (:meth:`architecture`); 0 coupling layers is a Gaussian mixture on the preprocessed features.
    dropout : float, default=0.2
        Dropout in the s/t MLPs.
    max_epochs : int, default=200
        Upper bound on passes over the unlabeled rows (early stopping usually ends sooner).
    max_steps : int or "auto", default="auto"
        Upper bound on optimizer steps per member ("auto": 800), so large tables fit in bounded time.
    learning_rate, weight_decay : float
        AdamW, cosine schedule.
    batch_size : int or "auto", default="auto"
        Unlabeled rows per step (all labeled rows join every step); "auto": an eighth of the unlabeled rows, at
        least 32 and at most 1024, so that an epoch has about 8 steps on small tables.
    objective : "generative" or "hybrid", default="generative"
        "generative": FlowGMM's tabular objective, the NLL of the labeled rows under their class's component plus
        the mixture NLL of the unlabeled rows. "hybrid": the mixture NLL of the unlabeled rows plus ``ce_weight`` x
        (number of features) x the cross-entropy of the labeled rows' class posteriors (the original's image
        objective puts a cross-entropy on its labeled rows).
    ce_weight : float, default=1.0
        Weight per feature of the labeled cross-entropy in the "hybrid" objective.
    label_weight : float or "equal", default=1.0
        Weight of a labeled row's NLL relative to an unlabeled row's in the "generative" objective: 1 is the joint
        likelihood of all rows, so the many unlabeled rows, not the few labeled ones, fix the components' shape.
        "equal": the labeled rows' mean NLL weighs as much as a batch's unlabeled mean NLL (the original code's
        tabular loss), which makes a labeled row count batch_size / n_labeled times an unlabeled one.
    unlabeled_weight : float, default=1.0
        Weight of the unlabeled NLL; 0 trains on the labeled rows only.
    class_prior : "learn", "uniform", array-like or dict, default="learn"
        Mixture weights pi used in training and prediction. "learn": estimated by EM from the unlabeled rows;
        "uniform": 1/K; an array (in ``classes_`` order) or a dict {class label: weight}: fixed.
    validation_fraction : float, default=0.1
        Unlabeled rows held out per member for early stopping (0 turns early stopping off).
    patience : int, default=20
        Epochs without a held-out NLL improvement before a member stops.
    dequantize : bool, default=True
        Dequantise tied (discrete) values during training (see the module docstring).
    n_quantiles : int, default=1000
        Reference quantiles per column of the preprocessing.
    n_neighbors : int, default=7
        k > 0: the graph step: spread the labels (and, with ``spreading_start`` > 0, the members' class posteriors)
        along a k-nearest-neighbour graph of the preprocessed training rows
        (:class:`~flowgmm_fast.graph.KNNSpreading`); a new row gets the mean of its k nearest training rows' spread
        distributions, and the fitted model keeps the preprocessed training rows (n_samples x n_features floats).
        0: no graph step. The graph gains on tables whose classes are made of several clusters (digits) and pulls
        imbalanced tables towards the majority class; combined with the ``distill`` step it is the default
        (experiments/RESULTS.md). :meth:`fit_graph` adds, changes or removes the steps on a fitted model without
        retraining.
    distill : bool, default=True
        The student step: a logistic regression (C = 0.1) fitted to the labeled rows (weight 5 each) and to
        FlowGMM's posteriors on the unlabeled training rows as soft targets
        (:class:`~flowgmm_fast.student.LogisticStudent`). With ``n_neighbors`` > 0 too, the prediction is the
        weighted mean of the two steps' probabilities (``graph_weight``).
    graph_weight : float in [0, 1] or "auto", default="auto"
        With both steps, the graph step's weight in the prediction (the student's is 1 - graph_weight). "auto": from
        the labeled rows (module docstring; ``step_scores_`` holds the two fold accuracies and the counts of held-out
        rows only one of the two recovers, ``graph_weight_`` the weight used).
    spreading_alpha : float in [0, 1), default=0.9
        How much a row's spread distribution takes from its neighbours against its start (label spreading's alpha).
    spreading_start : float, default=0.0
        Weight of FlowGMM's posterior as an unlabeled row's start, against 1 for a labeled row's one-hot label.
        0: plain label spreading, the step that the ``graph_weight="auto"`` folds measure; FlowGMM's posteriors then
        reach the prediction through the student step (and stay the answer of a row that no labeled row reaches).
        Measured against 0.2, 0.05 (the previous default) and 0.01 in experiments/RESULTS.md.
    invertible_backprop : bool, default=False
        Train the flows with backprop by inversion (:mod:`flowgmm_fast.nn.invertible`): the same gradients, training
        memory that does not grow with the number of coupling layers, at the cost of recomputing each coupling's
        s/t MLP in the backward pass. Worth it only for deep flows on large batches.
    device : str, default="cpu"
        "cpu", "cuda", "cuda:1", or "auto" (CUDA when available).
    random_state : int, RandomState or None
        Seeds everything (members, dropout, batch order, dequantisation, held-out slices).
    verbose : bool or int, default=False
        A progress bar per member and a summary line per member.

    Attributes
    ----------
    classes_ : ndarray of the class labels (sorted); n_features_in_ / feature_names_in_ : the input columns;
    class_prior_ : (n_classes,) the mixture weights used for prediction (mean over members);
    estimators_ : list of the fitted :class:`flowgmm_fast.FlowGMM` members; preprocessor_ : the fitted
    :class:`~flowgmm_fast.preprocessing.QuantileGaussianizer`; n_coupling_layers_, hidden_dim_ : the flow size used;
    n_iter_ : optimizer steps of each member; fit_time_ : seconds spent in ``fit``.
    """

    _parameter_constraints: dict = {
        "n_estimators": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_coupling_layers": [Interval(numbers.Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "hidden_dim": [Interval(numbers.Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "max_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_steps": [Interval(numbers.Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "weight_decay": [Interval(numbers.Real, 0, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "objective": [StrOptions({"hybrid", "generative"})],
        "ce_weight": [Interval(numbers.Real, 0, None, closed="left")],
        "label_weight": [Interval(numbers.Real, 0, None, closed="neither"), StrOptions({"equal"})],
        "unlabeled_weight": [Interval(numbers.Real, 0, None, closed="left")],
        "class_prior": [StrOptions({"learn", "uniform"}), "array-like", dict],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="left")],
        "patience": [Interval(numbers.Integral, 1, None, closed="left")],
        "dequantize": ["boolean"],
        "n_quantiles": [Interval(numbers.Integral, 2, None, closed="left")],
        "n_neighbors": [Interval(numbers.Integral, 0, None, closed="left")],
        "distill": ["boolean"],
        "graph_weight": [Interval(numbers.Real, 0, 1, closed="both"), StrOptions({"auto"})],
        "spreading_alpha": [Interval(numbers.Real, 0, 1, closed="left")],
        "spreading_start": [Interval(numbers.Real, 0, None, closed="left")],
        "invertible_backprop": ["boolean"],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(self, *, n_estimators: int = 5, n_coupling_layers="auto", hidden_dim="auto", dropout: float = 0.2,
                 max_epochs: int = 200, max_steps="auto", learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size="auto", objective: str = "generative", ce_weight: float = 1.0,
                 label_weight=1.0, unlabeled_weight: float = 1.0, class_prior="learn",
                 validation_fraction: float = 0.1, patience: int = 20, dequantize: bool = True,
                 n_quantiles: int = 1000, n_neighbors: int = 7, distill: bool = True, graph_weight="auto",
                 spreading_alpha: float = 0.9, spreading_start: float = 0.0, invertible_backprop: bool = False,
                 device: str = "cpu", random_state=None, verbose=False):
        self.n_estimators = n_estimators
        self.n_coupling_layers = n_coupling_layers
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.objective = objective
        self.ce_weight = ce_weight
        self.label_weight = label_weight
        self.unlabeled_weight = unlabeled_weight
        self.class_prior = class_prior
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.dequantize = dequantize
        self.n_quantiles = n_quantiles
        self.n_neighbors = n_neighbors
        self.distill = distill
        self.graph_weight = graph_weight
        self.spreading_alpha = spreading_alpha
        self.spreading_start = spreading_start
        self.invertible_backprop = invertible_backprop
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------------------------------------ sizing
    def architecture(self, n_rows: int, n_features: int) -> dict:
        """The flow size for a table of ``n_rows`` x ``n_features`` (the "auto" rule; explicit parameters win):
        4 coupling layers (none for a single feature) and s/t MLPs whose width grows with the square root of the
        number of rows (sqrt(n_rows) / 2 rounded to a power of two, from 16 up to 256 at 200,000 rows): the flow's
        parameters stay well below the number of values in the table, which keeps it from overfitting a small
        table, and the fit time bounded on a large one."""
        layers = (0 if n_features < 2 else 4) if self.n_coupling_layers == "auto" else int(self.n_coupling_layers)
        if n_features < 2 and layers:
            raise ValueError("n_coupling_layers must be 0 for a table with a single (non-constant) feature: a "
                             "coupling layer needs two features")
        if self.hidden_dim == "auto":
            width = int(2 ** round(math.log2(max(1.0, math.sqrt(n_rows) / 2))))
            hidden = int(min(256, max(16, width)))
        else:
            hidden = int(self.hidden_dim)
        return {"num_coupling_layers": layers, "hidden_dim": hidden}

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self, X, y):
        """Fit on ``X`` (n_samples, n_features) and the semi-supervised target ``y`` (n_samples,): class labels
        (any values: ints, strings, ...) for the labeled rows and -1 for the unlabeled ones."""
        self._validate_params()
        t0 = time.perf_counter()
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_min_samples=2, y_numeric=False)
        unl = unlabeled_mask(y)
        y_lab = y[~unl]
        if y_lab.size == 0:
            raise ValueError("y has no labeled row: every entry is -1 (unlabeled); label at least one row per class")
        check_classification_targets(y_lab)
        classes = np.unique(y_lab)
        if classes.size < 2:
            raise ValueError(f"y holds labeled rows of a single class ({classes.tolist()[0]!r}); "
                             "FlowGMMClassifier needs labeled rows of at least 2 classes")
        self.classes_ = classes
        codes = self._label_codes(y, unl)
        fixed_prior = self._fixed_prior(classes)
        device = _resolve_device(self.device)
        rng = np.random.RandomState(self.random_state) if not isinstance(self.random_state, np.random.RandomState) \
            else self.random_state
        base_seed = int(rng.randint(0, 2**31 - 1))

        self.preprocessor_ = QuantileGaussianizer(self.n_quantiles).fit(X)
        lo, hi = self.preprocessor_.intervals(X)
        z_mid = torch.from_numpy(QuantileGaussianizer.midpoint(lo, hi)).to(device)
        dequantize = self.dequantize and bool((hi > lo).any())
        lo_t = torch.from_numpy(lo).to(device) if dequantize else None
        hi_t = torch.from_numpy(hi).to(device) if dequantize else None
        labels = torch.from_numpy(codes).to(device)
        n_rows, dim = z_mid.shape
        arch = self.architecture(n_rows, dim)
        self.n_coupling_layers_, self.hidden_dim_ = arch["num_coupling_layers"], arch["hidden_dim"]
        n_unl = int(unl.sum())
        if self.batch_size == "auto":
            batch = min(1024, max(32, math.ceil(n_unl / 8)))
        else:
            batch = int(self.batch_size)
        batch = min(batch, max(1, n_unl))
        max_steps = 800 if self.max_steps == "auto" else int(self.max_steps)
        steps_per_epoch = max(1, math.ceil(max(1, n_unl) / batch))
        # the loop averages labeled and unlabeled rows separately: a per-row weight becomes a weight of the means
        n_lab = int(y.shape[0] - n_unl)
        if self.label_weight == "equal" or not (n_unl and self.unlabeled_weight > 0):
            lab_weight = 1.0
        else:
            lab_weight = self.label_weight * n_lab / batch
        epochs = min(float(self.max_epochs), max_steps / steps_per_epoch)

        def sampler(idx, gen):
            return QuantileGaussianizer.sample(lo_t[idx], hi_t[idx], gen)

        self.estimators_, self.n_iter_, self._fit_log = [], [], []
        for m in range(self.n_estimators):
            seed = (base_seed + 7919 * m) % (2**31 - 1)
            model = build_tabular_flowgmm(dim, classes.size, seed=seed, dropout=self.dropout,
                                          identity_init=True, means_trainable=True,
                                          invertible_backprop=self.invertible_backprop, **arch).to(device)
            init_means_from_labeled(model, z_mid, labels, min_separation=None)
            init_std_from_labeled(model, z_mid, labels)
            if fixed_prior is not None:
                with torch.no_grad():
                    model.prior.weight_logits.copy_(torch.from_numpy(np.log(fixed_prior)).float())
            hybrid = self.objective == "hybrid"
            config = FitConfig(epochs=epochs, lr=self.learning_rate, batch_size=batch,
                               unlabeled_weight=self.unlabeled_weight, label_weight=0.0 if hybrid else lab_weight,
                               ce_weight=self.ce_weight if hybrid else 0.0, weight_decay=self.weight_decay, seed=seed,
                               learn_priors=self.class_prior == "learn" if isinstance(self.class_prior, str)
                               else False,
                               validation_fraction=self.validation_fraction,
                               patience=self.patience if self.validation_fraction > 0 else None)
            desc = f"FlowGMM {m + 1}/{self.n_estimators}"
            result = fit_flowgmm(model, z_mid, labels, config, sampler=sampler if dequantize else None,
                                 progress=desc if self.verbose else False)
            model.eval()
            self.estimators_.append(model)
            self.n_iter_.append(result.steps)
            self._fit_log.append({"steps": result.steps, "best_step": result.best_step,
                                  "stopped_early": result.stopped_early})
            if self.verbose:
                print(f"{desc}: {result.steps} steps" + (f", best held-out NLL at step {result.best_step}"
                                                        if result.best_step is not None else ""), flush=True)
        self.class_prior_ = np.mean([torch.softmax(m.prior.weight_logits.detach().float(), 0).cpu().numpy()
                                     for m in self.estimators_], axis=0)
        self._build_steps(z_mid, codes)
        self.fit_time_ = time.perf_counter() - t0
        return self

    def _fixed_prior(self, classes: np.ndarray) -> np.ndarray | None:
        """The class_prior parameter as (K,) weights in ``classes`` order, or None when it is learned."""
        prior = self.class_prior
        if isinstance(prior, str):
            return np.full(classes.size, 1.0 / classes.size) if prior == "uniform" else None
        if isinstance(prior, dict):
            unknown = [k for k in prior if k not in set(classes.tolist())]
            if unknown:
                raise ValueError(f"class_prior names labels never seen among the labeled rows: {unknown!r} "
                                 f"(classes: {classes.tolist()!r})")
            missing = [c for c in classes.tolist() if c not in prior]
            if missing:
                raise ValueError(f"class_prior gives no weight for the classes {missing!r}")
            prior = [prior[c] for c in classes.tolist()]
        prior = np.asarray(prior, np.float64)
        if prior.shape != (classes.size,):
            raise ValueError(f"class_prior must have one weight per class ({classes.size}: {classes.tolist()!r}), "
                             f"got shape {prior.shape}")
        if not np.all(np.isfinite(prior)) or np.any(prior <= 0):
            raise ValueError(f"class_prior weights must be finite and > 0, got {prior.tolist()}")
        return prior / prior.sum()

    # ------------------------------------------------------------------------------------------------ predict
    def _features(self, X) -> torch.Tensor:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        device = next(self.estimators_[0].parameters(), torch.empty(0)).device
        return torch.from_numpy(self.preprocessor_.transform(X)).to(device)

    @torch.no_grad()
    def _member_outputs(self, z: torch.Tensor, batch: int = 8192):
        """Per member: (class log-posteriors (N, K), log p(z) (N,))."""
        outs = []
        for model in self.estimators_:
            logpost, logp = [], []
            for i in range(0, z.shape[0], batch):
                out = model(z[i:i + batch])
                logits = out.logits.double()
                logpost.append(torch.log_softmax(logits, 1))
                logp.append(-out.nll.double())
            outs.append((torch.cat(logpost) if logpost else z.new_zeros(0, self.classes_.size, dtype=torch.float64),
                         torch.cat(logp) if logp else z.new_zeros(0, dtype=torch.float64)))
        return outs

    def _flow_proba(self, z: torch.Tensor) -> np.ndarray:
        """(N, K) FlowGMM's class posteriors p(y | x), averaged over the members."""
        outs = self._member_outputs(z)
        return torch.stack([lp.exp() for lp, _ in outs]).mean(0).cpu().numpy()

    def flow_proba(self, X) -> np.ndarray:
        """(n_samples, n_classes) FlowGMM's own class posteriors p(y | x) (learned priors included), averaged over
        the members, before the graph and student steps: what :meth:`predict_proba` returns with ``n_neighbors=0``
        and ``distill=False`` (the training of the flows does not depend on either)."""
        return self._flow_proba(self._features(X))

    def _build_steps(self, z: torch.Tensor, codes: np.ndarray) -> None:
        """The prediction steps after FlowGMM (graph, student), fitted on the preprocessed training rows ``z``."""
        self.spreading_ = self.student_ = None
        self.graph_weight_, self.step_scores_ = None, None
        if self.n_neighbors == 0 and not self.distill:
            return
        x, start = z.cpu().numpy(), self._flow_proba(z)
        if self.n_neighbors > 0:
            self.spreading_ = KNNSpreading(**self._spreading_params()).fit(x, start, codes)
        if self.distill:
            self.student_ = LogisticStudent(**self._student_params()).fit(x, start, codes)
        if self.spreading_ is not None and self.student_ is not None:
            self.graph_weight_ = (self._auto_graph_weight(x, codes) if self.graph_weight == "auto"
                                  else float(self.graph_weight))
        if self.spreading_ is not None:
            self.spreading_.release_graph()  # only the weight's folds needed it

    def _auto_graph_weight(self, x: np.ndarray, codes: np.ndarray) -> float:
        """graph_weight="auto" (module docstring): over the held-out labeled rows, d = (b - c) / n with b the rows
        only the graph recovers and c those only the logistic regression does, shrunk towards 0 by its standard
        error sqrt(b + c) / n (a difference of one or two rows out of a dozen is noise); the graph's weight is
        0.5 + d_shrunk / (2 WEIGHT_MARGIN), clipped to [0, 1]. 0.5 when some class has fewer than 2 labeled rows.
        Sets ``step_scores_``."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold

        lab = np.flatnonzero(codes >= 0)
        y_lab = codes[lab]
        n_splits = min(WEIGHT_FOLDS, int(np.bincount(y_lab)[np.unique(y_lab)].min()))
        if n_splits < 2:
            return 0.5
        splits = list(StratifiedKFold(n_splits, shuffle=True, random_state=self._step_seed()).split(lab, y_lab))
        held = np.concatenate([h for _, h in splits])
        graph_right = self.spreading_.fold_predictions(codes, [lab[h] for _, h in splits]) == y_lab[held]
        linear = []
        for kept, h in splits:  # stratified with >= 2 rows per class: every class is in each kept part
            model = LogisticRegression(C=WEIGHT_LR_C, max_iter=2000).fit(x[lab[kept]], y_lab[kept])
            linear.append(model.predict(x[lab[h]]))
        linear_right = np.concatenate(linear) == y_lab[held]
        n = held.size
        only_graph, only_linear = int(np.sum(graph_right & ~linear_right)), int(np.sum(linear_right & ~graph_right))
        d = (only_graph - only_linear) / n
        shrunk = np.sign(d) * max(abs(d) - math.sqrt(only_graph + only_linear) / n, 0.0)
        self.step_scores_ = {"graph": float(graph_right.mean()), "linear": float(linear_right.mean()),
                             "only_graph": only_graph, "only_linear": only_linear, "folds": n_splits}
        return float(np.clip(0.5 + shrunk / (2 * WEIGHT_MARGIN), 0.0, 1.0))

    def fit_graph(self, X, y) -> "FlowGMMClassifier":
        """Build (or remove) the prediction steps after FlowGMM -- the graph (``n_neighbors``, ``spreading_*``) and
        the student (``distill``) -- of a fitted model from its training table ``X``, ``y`` (as given to
        :meth:`fit`, -1 = unlabeled) with the current parameters, without retraining the flows:
        ``clf.set_params(n_neighbors=0, distill=False).fit_graph(X, y)`` predicts what
        ``FlowGMMClassifier(n_neighbors=0, distill=False)`` fitted on the same data with the same seed predicts."""
        self._validate_params()
        z = self._features(X)
        y = np.asarray(y)
        if y.shape != (z.shape[0],):
            raise ValueError(f"y must have shape ({z.shape[0]},) (one entry per row of X), got {y.shape}")
        self._build_steps(z, self._label_codes(y, unlabeled_mask(y)))
        return self

    def _label_codes(self, y: np.ndarray, unl: np.ndarray) -> np.ndarray:
        """(n,) int64: the index in ``classes_`` of each labeled entry of ``y``, -1 where ``unl``."""
        codes = np.full(y.shape[0], -1, np.int64)
        known = np.isin(y[~unl], self.classes_)
        if not known.all():
            raise ValueError(f"y holds labels the model was not fitted on: {np.unique(y[~unl][~known]).tolist()!r}")
        codes[~unl] = np.searchsorted(self.classes_, y[~unl])
        return codes

    def _student_params(self) -> dict:
        """LogisticStudent's own defaults (C 0.1, labeled weight 5: chosen on seed 0 of the benchmark, checked on
        seeds 1-2, experiments/RESULTS.md) and the seed of its subsample of very large tables."""
        return {"seed": self._step_seed()}

    def _step_seed(self) -> int:
        """The seed of the prediction steps' own randomness (the student's subsample, the weight's folds): an
        integer ``random_state``, else 0, so that fit_graph rebuilds the same steps."""
        seed = self.random_state if isinstance(self.random_state, numbers.Integral) else 0
        return int(seed) % (2 ** 32)

    def _spreading_params(self) -> dict:
        return {"n_neighbors": int(self.n_neighbors), "alpha": float(self.spreading_alpha),
                "start_weight": float(self.spreading_start)}

    def predict_proba(self, X) -> np.ndarray:
        """(n_samples, n_classes) class probabilities; columns follow ``classes_``: ``graph_weight_`` x the graph
        step's (``n_neighbors`` > 0) plus (1 - ``graph_weight_``) x the student step's (``distill``) probabilities,
        the one step's when there is one, or FlowGMM's posteriors averaged over the members when there is neither
        (see the module docstring)."""
        z = self._features(X)
        steps = [s for s in (self.spreading_, self.student_) if s is not None]
        if not steps:
            return self._flow_proba(z)
        x = z.cpu().numpy()
        if len(steps) == 1:
            return steps[0].predict_proba(x)
        w = self.graph_weight_
        return w * self.spreading_.predict_proba(x) + (1.0 - w) * self.student_.predict_proba(x)

    def predict_log_proba(self, X) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """(n_samples,) the most probable class label of each row."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def score_samples(self, X) -> np.ndarray:
        """(n_samples,) log-likelihood of each row under the model (the members' densities averaged), in nats, on
        the preprocessed features (the quantile transform itself is not counted): larger is more typical, so a low
        value flags novel / out-of-distribution rows."""
        outs = self._member_outputs(self._features(X))
        logp = torch.stack([lp for _, lp in outs])
        return (torch.logsumexp(logp, 0) - math.log(len(outs))).cpu().numpy()

    @torch.no_grad()
    def sample(self, n_samples: int = 1, class_label=None, random_state=None) -> np.ndarray:
        """(n_samples, n_features_in_) rows drawn from the model (from the class ``class_label`` when given, else
        from the mixture with the learned priors), mapped back to the original feature units (constant columns
        take their constant value)."""
        check_is_fitted(self)
        if not isinstance(n_samples, numbers.Integral) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        class_id = None
        if class_label is not None:
            hits = np.flatnonzero(self.classes_ == class_label) if np.ndim(class_label) == 0 else []
            if len(hits) != 1:
                raise ValueError(f"class_label {class_label!r} is not one of the classes {self.classes_.tolist()!r}")
            class_id = int(hits[0])
        rng = np.random.RandomState(random_state) if not isinstance(random_state, np.random.RandomState) \
            else random_state
        gen = torch.Generator().manual_seed(int(rng.randint(0, 2**31 - 1)))
        members = torch.randint(0, len(self.estimators_), (n_samples,), generator=gen)
        z = np.empty((n_samples, self.preprocessor_.n_features_out))
        for m, model in enumerate(self.estimators_):
            rows = torch.nonzero(members == m).squeeze(1)
            if rows.numel():
                xs = FlowGMM.sample(model, rows.numel(), class_id, generator=gen)
                z[rows.numpy()] = xs.double().cpu().numpy()
        return self.preprocessor_.inverse_transform(z)

    # ------------------------------------------------------------------------------------------------ persistence
    def _member_spec(self) -> dict:
        return {"dim": self.preprocessor_.n_features_out, "num_classes": int(self.classes_.size),
                "num_coupling_layers": int(self.n_coupling_layers_), "hidden_dim": int(self.hidden_dim_),
                "dropout": float(self.dropout)}

    def _fitted_state(self) -> tuple[dict, dict]:
        """(JSON-able configuration, {name: tensor}) of a fitted estimator: everything :meth:`load` needs."""
        check_is_fitted(self)
        classes = self.classes_
        kind = "str" if classes.dtype.kind in "USO" else ("int" if classes.dtype.kind in "iu" else
                                                          ("bool" if classes.dtype.kind == "b" else "float"))
        config = {
            "format": FORMAT_VERSION, "library": "flowgmm_fast", "version": __version__,
            "params": {k: (v if not isinstance(v, np.ndarray) else v.tolist()) for k, v in self.get_params().items()
                       if k != "random_state" or isinstance(v, (int, type(None)))},
            "classes": [c.item() if hasattr(c, "item") else c for c in classes], "classes_kind": kind,
            "classes_dtype": str(classes.dtype) if kind != "str" else "str",
            "n_features_in": int(self.n_features_in_),
            "feature_names_in": (self.feature_names_in_.tolist() if hasattr(self, "feature_names_in_") else None),
            "member": self._member_spec(), "n_members": len(self.estimators_), "n_iter": list(self.n_iter_),
            "class_prior": self.class_prior_.tolist(), "fit_time_s": round(float(self.fit_time_), 3),
            "spreading": (None if self.spreading_ is None else
                          {"n_neighbors": self.spreading_.n_neighbors, "alpha": self.spreading_.alpha,
                           "start_weight": self.spreading_.start_weight}),
            "student": (None if self.student_ is None else
                        {"C": self.student_.C, "labeled_weight": self.student_.labeled_weight,
                         "max_rows": self.student_.max_rows, "seed": self.student_.seed}),
            "graph_weight": self.graph_weight_, "step_scores": self.step_scores_,
        }
        tensors = {f"preprocessor.{k}": torch.from_numpy(np.ascontiguousarray(v))
                   for k, v in self.preprocessor_.state().items()}
        for m, model in enumerate(self.estimators_):
            for k, v in model.state_dict().items():
                tensors[f"member{m}.{k}"] = v.detach().cpu().contiguous()
        if self.spreading_ is not None:
            for k, v in self.spreading_.state().items():
                tensors[f"spreading.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        if self.student_ is not None:
            for k, v in self.student_.state().items():
                tensors[f"student.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        return config, tensors

    def save(self, path) -> Path:
        """Write the fitted model to the folder ``path`` (created; an existing model folder there is replaced
        atomically): ``config.json`` (parameters, classes, sizes, versions) and ``weights.safetensors``
        (preprocessing and every member's weights). :meth:`load` reads it without pickle."""
        from safetensors.torch import save_file

        config, tensors = self._fitted_state()
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"path {str(path)!r} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).exists():
            raise ValueError(f"path {str(path)!r} is a non-empty folder that does not hold a saved FlowGMMClassifier; "
                             "refusing to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": str(FORMAT_VERSION)})
            with open(tmp / CONFIG_FILE, "w") as f:
                json.dump(config, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path, device: str | None = None) -> "FlowGMMClassifier":
        """Read a model written by :meth:`save` (no pickle: JSON + safetensors). ``device`` overrides the saved
        one (e.g. "cpu" for a model trained on a GPU)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} does not hold a saved FlowGMMClassifier ({CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE})")
        with open(path / CONFIG_FILE) as f:
            config = json.load(f)
        if config.get("library") != "flowgmm_fast" or config.get("format") != FORMAT_VERSION:
            raise ValueError(f"{str(path)!r}: not a FlowGMMClassifier folder of format {FORMAT_VERSION} "
                             f"(library {config.get('library')!r}, format {config.get('format')!r})")
        tensors = load_file(str(path / WEIGHTS_FILE))
        params = dict(config["params"])
        if device is not None:
            params["device"] = device
        params["class_prior"] = params.get("class_prior", "learn")
        est = cls(**params)
        est._restore(config, tensors)
        return est

    def _restore(self, config: dict, tensors: dict) -> None:
        kind = config["classes_kind"]
        classes = config["classes"]
        self.classes_ = (np.asarray(classes, dtype=str) if kind == "str" else
                         np.asarray(classes, dtype=config.get("classes_dtype", None)))
        self.n_features_in_ = int(config["n_features_in"])
        if config.get("feature_names_in") is not None:
            self.feature_names_in_ = np.asarray(config["feature_names_in"], dtype=object)
        self.preprocessor_ = QuantileGaussianizer.from_state(
            {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("preprocessor.")})
        spec = config["member"]
        self.n_coupling_layers_, self.hidden_dim_ = spec["num_coupling_layers"], spec["hidden_dim"]
        device = _resolve_device(self.device)
        self.estimators_ = []
        for m in range(int(config["n_members"])):
            prefix = f"member{m}."
            model = build_tabular_flowgmm(spec["dim"], spec["num_classes"],
                                          num_coupling_layers=spec["num_coupling_layers"],
                                          hidden_dim=spec["hidden_dim"], dropout=spec["dropout"])
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            self.estimators_.append(model.to(device).eval())
        self.n_iter_ = list(config.get("n_iter", []))
        self.class_prior_ = np.asarray(config["class_prior"])
        self.fit_time_ = float(config.get("fit_time_s", 0.0))
        self.spreading_ = None
        if config.get("spreading"):  # the parameters the graph was built with, which set_params may have changed
            self.spreading_ = KNNSpreading.from_state(
                {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("spreading.")},
                **config["spreading"])
        self.student_ = None
        if config.get("student"):
            self.student_ = LogisticStudent.from_state(
                {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("student.")},
                n_classes=self.classes_.size, **config["student"])
        # folders saved before the weights existed predicted with the mean of the two steps
        both = self.spreading_ is not None and self.student_ is not None
        weight = config.get("graph_weight")
        self.graph_weight_ = (0.5 if weight is None else float(weight)) if both else None
        self.step_scores_ = config.get("step_scores")

    # pickle / joblib / deepcopy: the flows hold weight-normalised (parametrized) layers, which torch serialises
    # through state dicts only, so the fitted state goes through the same path as save/load.
    def __getstate__(self):
        state = self.__dict__.copy()
        if "estimators_" in state:
            config, tensors = self._fitted_state()
            for key in ("estimators_", "preprocessor_", "classes_", "n_features_in_", "feature_names_in_",
                        "n_coupling_layers_", "hidden_dim_", "n_iter_", "class_prior_", "fit_time_",
                        "spreading_", "student_", "graph_weight_", "step_scores_"):
                state.pop(key, None)
            state["_fitted"] = (config, {k: v.numpy() for k, v in tensors.items()})
        return state

    def __setstate__(self, state):
        fitted = state.pop("_fitted", None)
        self.__dict__.update(state)
        if fitted is not None:
            config, arrays = fitted
            self._restore(config, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        tags.input_tags.allow_nan = False
        return tags
