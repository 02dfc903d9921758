"""The bad-input catalogue: wrong arguments to the functional API, the layers, the model, the data readers and the
training utilities. Each must raise the expected ValueError / TypeError (or a project error deriving from them) whose
message names the argument -- not a PyTorch error about something else, and never a silent success.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import flowgmm_fast as ff
from flowgmm_fast import functional as F
from flowgmm_fast.data import SemiSupervisedLoader, ImageData
from flowgmm_fast.data import tabular as T
from flowgmm_fast.nn import (AffineCoupling, GaussianMixture, Logit, RealNVP, RealNVPTabular, Squeeze)
from flowgmm_fast.training import (CheckpointError, Trainer, load_checkpoint, make_lr_scheduler, save_checkpoint,
                                   seed_everything, set_learning_rate, weight_decay_param_groups)

g = torch.Generator().manual_seed(0)
X4 = torch.randn(2, 3, 4, 4, generator=g)
X2 = torch.randn(2, 5, generator=g)
Z = torch.randn(4, 6, generator=g)
MEANS = torch.randn(3, 6, generator=g)
LOG_STD = torch.zeros(3)
LABELS = torch.tensor([0, -1, 2, 1])
U = torch.rand(2, 3, 4, 4, generator=g) * 0.9 + 0.05


def _tab_model():
    return ff.FlowGMM(RealNVPTabular(4, 2, 8), GaussianMixture(2, 4))


def _img_model():
    return ff.FlowGMM(RealNVP(1, 2, 4, 1), GaussianMixture(2, 16))


def _opt():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)


class _WrongST(nn.Module):
    def forward(self, x):
        return torch.cat([x, x, x], 1)


CASES = [
    # ------------------------------------------------------------------------------------- affine_coupling
    ("coupling x list", lambda: F.affine_coupling([1.0], X4, X4), TypeError, "x"),
    ("coupling x int", lambda: F.affine_coupling(X4.long(), X4, X4), TypeError, "x"),
    ("coupling x 1-D", lambda: F.affine_coupling(X4[0, 0, 0], X4[0, 0, 0], X4[0, 0, 0]), ValueError, "x"),
    ("coupling s shape", lambda: F.affine_coupling(X4, X4[:1], X4), ValueError, "s"),
    ("coupling s list", lambda: F.affine_coupling(X4, [0.0], X4), TypeError, "s"),
    ("coupling t dtype", lambda: F.affine_coupling(X4, X4, X4.double()), TypeError, "t"),
    ("coupling joint s shape", lambda: F.affine_coupling(X4, X4, None), ValueError, "s"),
    ("coupling joint s dtype", lambda: F.affine_coupling(X4, torch.cat([X4, X4], 1).double(), None), TypeError, "s"),
    ("coupling scale length", lambda: F.affine_coupling(X4, X4, X4, scale=torch.ones(4)), ValueError, "scale"),
    ("coupling scale 2-D", lambda: F.affine_coupling(X4, X4, X4, scale=torch.ones(3, 2)), ValueError, "scale"),
    ("coupling scale int", lambda: F.affine_coupling(X4, X4, X4, scale=torch.ones(3, dtype=torch.long)), TypeError,
     "scale"),
    ("coupling scale CHW on vectors", lambda: F.affine_coupling(X2, X2, X2, scale=torch.ones(5, 1, 1)), ValueError,
     "scale"),
    ("coupling scale float", lambda: F.affine_coupling(X4, X4, X4, scale=2.0), TypeError, "scale"),
    ("coupling mask shape", lambda: F.affine_coupling(X4, X4, X4, mask=torch.ones(5, 4)), ValueError, "mask"),
    ("coupling mask 0.5", lambda: F.affine_coupling(X4, X4, X4, mask=torch.full((3, 4, 4), 0.5)), ValueError, "mask"),
    ("coupling mask 2", lambda: F.affine_coupling(X4, X4, X4, mask=torch.full((4, 4), 2.0)), ValueError, "mask"),
    ("coupling mask -1", lambda: F.affine_coupling(X2, X2, X2, mask=-torch.ones(5)), ValueError, "mask"),
    ("coupling mask nan", lambda: F.affine_coupling(X2, X2, X2, mask=torch.tensor([0, 1, math.nan, 0, 1])),
     ValueError, "mask"),
    ("coupling mask int 3", lambda: F.affine_coupling(X2, X2, X2, mask=torch.tensor([0, 1, 3, 0, 1])), ValueError,
     "mask"),
    ("coupling mask per sample", lambda: F.affine_coupling(X4, X4, X4, mask=torch.ones(2, 3, 4, 4)), ValueError,
     "mask"),
    ("coupling mask 5-D", lambda: F.affine_coupling(X4, X4, X4, mask=torch.ones(1, 1, 1, 4, 4)), ValueError, "mask"),
    ("coupling mask list", lambda: F.affine_coupling(X2, X2, X2, mask=[0, 1, 0, 1, 0]), TypeError, "mask"),
    ("coupling mask complex", lambda: F.affine_coupling(X2, X2, X2, mask=torch.ones(5, dtype=torch.complex64)),
     TypeError, "mask"),
    ("coupling checkerboard on vectors", lambda: F.affine_coupling(X2, X2, X2, mask=F.checkerboard(0)), ValueError,
     "mask"),
    ("coupling checkerboard parity 2", lambda: F.checkerboard(2), ValueError, "parity"),
    ("coupling sldj length", lambda: F.affine_coupling(X4, X4, X4, sldj=torch.zeros(3)), ValueError, "sldj"),
    ("coupling sldj half", lambda: F.affine_coupling(X4, X4, X4, sldj=torch.zeros(2).half()), TypeError, "sldj"),
    ("coupling sldj 2-D", lambda: F.affine_coupling(X4, X4, X4, sldj=torch.zeros(2, 1)), ValueError, "sldj"),
    ("coupling reverse str", lambda: F.affine_coupling(X4, X4, X4, reverse="no"), TypeError, "reverse"),
    ("coupling reverse int", lambda: F.affine_coupling(X4, X4, X4, reverse=1), TypeError, "reverse"),
    ("coupling reverse None", lambda: F.affine_coupling(X4, X4, X4, reverse=None), TypeError, "reverse"),
    # ------------------------------------------------------------------------------------- squeeze2x2
    ("squeeze x 3-D", lambda: F.squeeze2x2(X4[0]), ValueError, "x"),
    ("squeeze x list", lambda: F.squeeze2x2([[1.0]]), TypeError, "x"),
    ("squeeze odd height", lambda: F.squeeze2x2(X4[:, :, :3]), ValueError, "x"),
    ("squeeze reverse channels", lambda: F.squeeze2x2(X4, reverse=True), ValueError, "x"),
    ("squeeze reverse str", lambda: F.squeeze2x2(X4, reverse="yes"), TypeError, "reverse"),
    ("squeeze alt_order int", lambda: F.squeeze2x2(X4, alt_order=1), TypeError, "alt_order"),
    # ------------------------------------------------------------------------------------- logit_transform
    ("logit alpha negative", lambda: F.logit_transform(U, alpha=-0.1), ValueError, "alpha"),
    ("logit alpha 0.5", lambda: F.logit_transform(U, alpha=0.5), ValueError, "alpha"),
    ("logit alpha nan", lambda: F.logit_transform(U, alpha=math.nan), ValueError, "alpha"),
    ("logit alpha str", lambda: F.logit_transform(U, alpha="0.1"), TypeError, "alpha"),
    ("logit alpha bool", lambda: F.logit_transform(U, alpha=True), TypeError, "alpha"),
    ("logit alpha tensor", lambda: F.logit_transform(U, alpha=torch.tensor(0.1)), TypeError, "alpha"),
    ("logit noise shape", lambda: F.logit_transform(U, noise=U[:1]), ValueError, "noise"),
    ("logit noise reverse", lambda: F.logit_transform(U, reverse=True, noise=U), ValueError, "noise"),
    ("logit noise dtype", lambda: F.logit_transform(U, noise=U.double()), TypeError, "noise"),
    ("logit x uint8", lambda: F.logit_transform((U * 255).to(torch.uint8)), TypeError, "x"),
    ("logit x 0-d", lambda: F.logit_transform(torch.tensor(0.5)), ValueError, "x"),
    ("logit sldj length", lambda: F.logit_transform(U, sldj=torch.zeros(5)), ValueError, "sldj"),
    ("logit reverse str", lambda: F.logit_transform(U, reverse="no"), TypeError, "reverse"),
    # ------------------------------------------------------------------------------------- gmm
    ("gmm z 1-D", lambda: F.gmm_nll(Z[0], MEANS, LOG_STD), ValueError, "z"),
    ("gmm z list", lambda: F.gmm_nll([[0.0]], MEANS, LOG_STD), TypeError, "z"),
    ("gmm z int", lambda: F.gmm_log_prob(Z.long(), MEANS, LOG_STD), TypeError, "z"),
    ("gmm means width", lambda: F.gmm_nll(Z, MEANS[:, :5], LOG_STD), ValueError, "means"),
    ("gmm means empty", lambda: F.gmm_nll(Z, MEANS[:0], LOG_STD[:0]), ValueError, "means"),
    ("gmm means int", lambda: F.gmm_log_prob(Z, MEANS.long(), LOG_STD), TypeError, "means"),
    ("gmm log_std shape", lambda: F.gmm_nll(Z, MEANS, torch.zeros(4)), ValueError, "log_std"),
    ("gmm log_std int", lambda: F.gmm_nll(Z, MEANS, torch.zeros(3, dtype=torch.long)), TypeError, "log_std"),
    ("gmm weight_logits shape", lambda: F.gmm_nll(Z, MEANS, LOG_STD, torch.zeros(4)), ValueError, "weight_logits"),
    ("gmm weight_logits 2-D", lambda: F.gmm_log_prob(Z, MEANS, LOG_STD, torch.zeros(3, 1)), ValueError,
     "weight_logits"),
    ("gmm labels float", lambda: F.gmm_nll(Z, MEANS, LOG_STD, labels=LABELS.float()), TypeError, "labels"),
    ("gmm labels 2-D", lambda: F.gmm_nll(Z, MEANS, LOG_STD, labels=LABELS[:, None]), ValueError, "labels"),
    ("gmm labels length", lambda: F.gmm_nll(Z, MEANS, LOG_STD, labels=LABELS[:3]), ValueError, "labels"),
    ("gmm labels >= K", lambda: F.gmm_nll(Z, MEANS, LOG_STD, labels=torch.tensor([0, 3, 1, 1])), ValueError,
     "labels"),
    ("gmm labels < -1", lambda: F.gmm_nll(Z, MEANS, LOG_STD, labels=torch.tensor([0, -2, 1, 1])), ValueError,
     "labels"),
    ("gmm label_weight nan", lambda: F.gmm_nll(Z, MEANS, LOG_STD, labels=LABELS, label_weight=math.nan), ValueError,
     "label_weight"),
    ("gmm label_weight inf", lambda: F.gmm_nll(Z, MEANS, LOG_STD, labels=LABELS, label_weight=math.inf), ValueError,
     "label_weight"),
    ("gmm label_weight str", lambda: F.gmm_nll(Z, MEANS, LOG_STD, label_weight="1"), TypeError, "label_weight"),
    ("gmm label_weight bool", lambda: F.gmm_nll(Z, MEANS, LOG_STD, label_weight=True), TypeError, "label_weight"),
    ("gmm label_weight tensor", lambda: F.gmm_nll(Z, MEANS, LOG_STD, label_weight=torch.tensor(1.0)), TypeError,
     "label_weight"),
    ("gmm return_logits str", lambda: F.gmm_nll(Z, MEANS, LOG_STD, return_logits="yes"), TypeError,
     "return_logits"),
    # ------------------------------------------------------------------------------------- layers
    ("AffineCoupling channels 0", lambda: AffineCoupling(0), ValueError, "channels"),
    ("AffineCoupling mask_type", lambda: AffineCoupling(3, "diagonal"), ValueError, "mask_type"),
    ("AffineCoupling channel odd", lambda: AffineCoupling(3, "channel"), ValueError, "channels"),
    ("AffineCoupling checkerboard on vectors", lambda: AffineCoupling(5, st_net=nn.Identity())(X2), ValueError, "x"),
    ("AffineCoupling half on images", lambda: AffineCoupling(3, "half", st_net=nn.Identity())(X4), ValueError, "x"),
    ("AffineCoupling channel on vectors", lambda: AffineCoupling(4, "channel", st_net=nn.Identity())(X2[:, :4]),
     ValueError, "x"),
    ("AffineCoupling wrong channels", lambda: AffineCoupling(4, st_net=nn.Identity())(X4), ValueError, "x"),
    ("AffineCoupling st_net output", lambda: AffineCoupling(5, "half", st_net=_WrongST())(X2), ValueError, "st_net"),
    ("AffineCoupling x list", lambda: AffineCoupling(3, st_net=nn.Identity())([1.0]), TypeError, "x"),
    ("Squeeze x 3-D", lambda: Squeeze()(X4[0]), ValueError, "x"),
    ("Logit alpha 0.7", lambda: Logit(alpha=0.7), ValueError, "alpha"),
    ("Logit alpha str", lambda: Logit(alpha="0.05"), TypeError, "alpha"),
    ("Logit uint8 images", lambda: Logit(dequantize=True)((U * 255).to(torch.uint8)), TypeError, "x"),
    ("RealNVP in_channels 0", lambda: RealNVP(0, 1, 4, 1), ValueError, "in_channels"),
    ("RealNVP in_channels float", lambda: RealNVP(1.5, 1, 4, 1), TypeError, "in_channels"),
    ("RealNVP num_scales 0", lambda: RealNVP(1, 0, 4, 1), ValueError, "num_scales"),
    ("RealNVP mid_channels 0", lambda: RealNVP(1, 1, 0, 1), ValueError, "mid_channels"),
    ("RealNVP num_blocks -1", lambda: RealNVP(1, 1, 4, -1), ValueError, "num_blocks"),
    ("RealNVP x channels", lambda: RealNVP(1, 1, 4, 1)(X4), ValueError, "x"),
    ("RealNVP x not divisible", lambda: RealNVP(3, 2, 4, 1)(torch.rand(2, 3, 6, 5)), ValueError, "x"),
    ("RealNVP float64 x", lambda: RealNVP(3, 1, 4, 1)(U.double()), TypeError, "x"),
    ("RealNVP uint8 x", lambda: RealNVP(3, 1, 4, 1)((U * 255).to(torch.uint8)), TypeError, "x"),
    ("RealNVPTabular dim 1", lambda: RealNVPTabular(1), ValueError, "dim"),
    ("RealNVPTabular dim float", lambda: RealNVPTabular(4.0), TypeError, "dim"),
    ("RealNVPTabular couplings 0", lambda: RealNVPTabular(4, 0), ValueError, "num_coupling_layers"),
    ("RealNVPTabular x width", lambda: RealNVPTabular(4, 2, 8)(X2), ValueError, "x"),
    ("RealNVPTabular float64 x", lambda: RealNVPTabular(5, 2, 8)(X2.double()), TypeError, "x"),
    ("GaussianMixture num_classes float", lambda: GaussianMixture(2.5, 4), TypeError, "num_classes"),
    ("GaussianMixture num_classes 0", lambda: GaussianMixture(0, 4), ValueError, "num_classes"),
    ("GaussianMixture dim 0", lambda: GaussianMixture(2, 0), ValueError, "dim"),
    ("GaussianMixture covariance", lambda: GaussianMixture(2, 4, covariance="full"), ValueError, "covariance"),
    ("GaussianMixture std 0", lambda: GaussianMixture(2, 4, std=0), ValueError, "std"),
    ("GaussianMixture std nan", lambda: GaussianMixture(2, 4, std=math.nan), ValueError, "std"),
    ("GaussianMixture std str", lambda: GaussianMixture(2, 4, std="1"), TypeError, "std"),
    ("GaussianMixture means shape", lambda: GaussianMixture(2, 4, means=torch.zeros(3, 4)), ValueError, "means"),
    ("GaussianMixture means list", lambda: GaussianMixture(2, 4, means=[[0.0] * 4] * 2), TypeError, "means"),
    ("GaussianMixture means nan", lambda: GaussianMixture(2, 4, means=torch.full((2, 4), math.nan)), ValueError,
     "means"),
    ("GaussianMixture means_init", lambda: GaussianMixture(2, 4, means_init="kmeans"), ValueError, "means init"),
    ("GaussianMixture sample n -1", lambda: GaussianMixture(2, 4).sample(-1), ValueError, "n"),
    ("GaussianMixture sample n float", lambda: GaussianMixture(2, 4).sample(2.5), TypeError, "n"),
    ("GaussianMixture sample class_id", lambda: GaussianMixture(2, 4).sample(2, class_id=5), ValueError, "class_id"),
    ("GaussianMixture nll z width", lambda: GaussianMixture(2, 4).nll(Z), ValueError, "z"),
    # ------------------------------------------------------------------------------------- model
    ("FlowGMM prior type", lambda: ff.FlowGMM(RealNVPTabular(4), "gmm"), TypeError, "prior"),
    ("FlowGMM flow type", lambda: ff.FlowGMM(lambda x: x, GaussianMixture(2, 4)), TypeError, "flow"),
    ("FlowGMM event_shape size", lambda: ff.FlowGMM(RealNVP(1, 1, 4, 1), GaussianMixture(2, 16), (1, 3, 3)),
     ValueError, "event_shape"),
    ("FlowGMM prior dim", lambda: ff.FlowGMM(RealNVPTabular(4, 2, 8), GaussianMixture(2, 5))(torch.randn(2, 4)),
     ValueError, "dim"),
    ("FlowGMM x list", lambda: _tab_model()([[0.0] * 4]), TypeError, "x"),
    ("FlowGMM labels length", lambda: _tab_model()(torch.randn(3, 4), torch.tensor([0, 1])), ValueError, "labels"),
    ("FlowGMM labels out of range", lambda: _tab_model()(torch.randn(2, 4), torch.tensor([0, 2])), ValueError,
     "labels"),
    ("FlowGMM label_weight nan", lambda: _tab_model()(torch.randn(2, 4), torch.tensor([0, 1]), math.nan),
     ValueError, "label_weight"),
    ("FlowGMM bits_per_dim num_bins 0", lambda: _tab_model().bits_per_dim(torch.randn(2, 4), num_bins=0),
     ValueError, "num_bins"),
    ("FlowGMM bits_per_dim num_bins float", lambda: _tab_model().bits_per_dim(torch.randn(2, 4), num_bins=2.5),
     TypeError, "num_bins"),
    ("FlowGMM sample n -1", lambda: _tab_model().sample(-1), ValueError, "n"),
    ("FlowGMM sample no event_shape", lambda: ff.FlowGMM(RealNVP(1, 2, 4, 1), GaussianMixture(2, 16)).sample(2),
     ValueError, "event_shape"),
    ("FlowGMM predict x shape", lambda: _img_model().predict(torch.rand(2, 1, 4)), ValueError, "x"),
    ("FlowGMM predict x float64", lambda: _img_model().predict(torch.rand(2, 1, 4, 4).double()), TypeError, "x"),
    # ------------------------------------------------------------------------------------- backends, data, training
    ("set_backend name", lambda: ff.set_backend("cuda"), ValueError, "backend"),
    ("semisup_labels one class", lambda: T.semisup_labels(np.array([0, 1, 0, 1]), [0, 2]), ValueError,
     "labeled_idx"),
    ("semisup_labels range", lambda: T.semisup_labels(np.array([0, 1]), [5]), ValueError, "labeled_idx"),
    ("SemiSupervisedLoader batch_size", lambda: SemiSupervisedLoader(
        ImageData(torch.zeros(20, 1, 28, 28, dtype=torch.uint8), torch.arange(20) % 10, "mnist"), np.arange(10), 3),
     ValueError, "batch_size"),
    ("ImageData dtype", lambda: ImageData(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), "mnist"),
     ValueError, "images"),
    ("Trainer steps_per_epoch", lambda: Trainer(_tab_model(), {"flow": _opt()}, steps_per_epoch=0), ValueError,
     "steps_per_epoch"),
    ("Trainer max_grad_norm", lambda: Trainer(_tab_model(), {"flow": _opt()}, steps_per_epoch=1, max_grad_norm=0),
     ValueError, "max_grad_norm"),
    ("Trainer check_every", lambda: Trainer(_tab_model(), {"flow": _opt()}, steps_per_epoch=1, check_every=0),
     ValueError, "check_every"),
    ("Trainer optimizers", lambda: Trainer(_tab_model(), {}, steps_per_epoch=1), ValueError, "optimizers"),
    ("Trainer.fit max_steps", lambda: Trainer(_tab_model(), {"flow": _opt()}, steps_per_epoch=1).fit(
        lambda s: iter(()), lambda b, t: None, max_steps=-1), ValueError, "max_steps"),
    ("Trainer.fit log_every", lambda: Trainer(_tab_model(), {"flow": _opt()}, steps_per_epoch=1).fit(
        lambda s: iter(()), lambda b, t: None, max_steps=1, log_every=0), ValueError, "log_every"),
    ("make_lr_scheduler kind", lambda: make_lr_scheduler(_opt(), "step"), ValueError, "kind"),
    ("make_lr_scheduler total_steps", lambda: make_lr_scheduler(_opt(), "cosine"), ValueError, "total_steps"),
    ("weight_decay negative", lambda: weight_decay_param_groups(nn.Linear(2, 2), -1.0), ValueError,
     "weight_decay"),
    ("set_learning_rate 0", lambda: set_learning_rate(_opt(), None, 0.0), ValueError, "lr"),
    ("seed_everything str", lambda: seed_everything("1"), TypeError, "seed"),
    ("load_checkpoint missing", lambda: load_checkpoint("/nonexistent/last.pt", _tab_model()), CheckpointError,
     "checkpoint"),
    ("save_checkpoint extra object", lambda: save_checkpoint("/tmp/unused.pt", _tab_model(), step=0, epoch=0,
                                                             extra={"fn": print}), TypeError, "extra"),
]


@pytest.mark.parametrize("call,error,name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_wrong_input_raises_naming_the_argument(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, (ValueError, TypeError, CheckpointError)), type(info.value)
    message = str(info.value)
    assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message), \
        f"the message does not name {name!r}: {message}"


def test_catalogue_is_broad():
    """The issue asks for 100+ kinds of wrong input across the API levels."""
    assert len(CASES) >= 100
    assert len({c[0] for c in CASES}) == len(CASES)


def test_mask_of_shape_1_1_h_w_is_accepted_and_means_the_same():
    m = (torch.arange(16).reshape(4, 4) % 2).float()
    for mask in (m, m[None], m[None, None], m.bool(), m.long()[None, None]):
        y, ldj = F.affine_coupling(X4, X4, X4, mask=mask)
        y_ref, ldj_ref = F.affine_coupling(X4, X4, X4, mask=m.expand(3, 4, 4))
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(ldj, ldj_ref)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_empty_batches_on_every_backend(backend):
    if ff.unavailable_reason(backend) is not None:
        pytest.skip(ff.unavailable_reason(backend))
    with ff.use_backend(backend):
        y, ldj = F.affine_coupling(X4[:0], X4[:0], X4[:0], mask=F.checkerboard(1))
        assert y.shape == (0, 3, 4, 4) and ldj.shape == (0,)
        y, ldj = F.affine_coupling(X2[:0], X2[:0], X2[:0], scale=torch.ones(5))
        assert y.shape == (0, 5) and ldj.shape == (0,)
        y, ldj = F.logit_transform(U[:0], sldj=torch.zeros(0))
        assert y.shape == (0, 3, 4, 4) and ldj.shape == (0,)
        assert F.gmm_nll(Z[:0], MEANS, LOG_STD).shape == (0,)


def test_debug_mode_checks_every_op():
    from flowgmm_fast import debug

    bad = X4.clone()
    bad[0, 0, 0, 0] = math.nan
    calls = {
        "affine_coupling: s": lambda: F.affine_coupling(X4, bad, X4),
        "squeeze2x2: x": lambda: F.squeeze2x2(bad),
        "logit_transform: x": lambda: F.logit_transform(bad),
        "gmm_log_prob: z": lambda: F.gmm_log_prob(bad.flatten(1)[:, :6], MEANS, LOG_STD),
        "gmm_nll: means": lambda: F.gmm_nll(Z, MEANS.masked_fill(MEANS > 1, math.inf), LOG_STD),
        "affine_coupling: y": lambda: F.affine_coupling(X4, torch.full_like(X4, 1000.0), X4),
        "logit_transform: y": lambda: F.logit_transform(torch.ones(2, 3) * 2.0),
    }
    for name, call in calls.items():
        call()  # off by default: no check, no error
    debug.enable()
    try:
        for name, call in calls.items():
            with pytest.raises(debug.NonFiniteError, match=re.escape(name)):
                call()
    finally:
        debug.enable(False)


def test_mask_values_checked_once_per_tensor_and_again_after_an_in_place_change():
    m = torch.ones(5)
    m[:2] = 0
    F.affine_coupling(X2, X2, X2, mask=m)
    m[0] = 0.5  # bumps the version: checked again
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        F.affine_coupling(X2, X2, X2, mask=m)
