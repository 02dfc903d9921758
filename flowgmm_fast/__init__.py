"""flowgmm_fast: fast FlowGMM (semi-supervised learning with normalizing flows) with fused Triton and C++/CUDA kernels.

API levels (each built only on the one below it):
  flowgmm_fast.functional  -- the fused ops (affine_coupling, squeeze2x2, logit_transform, gmm_log_prob, gmm_nll)
  flowgmm_fast.nn          -- layers and flows (AffineCoupling, Squeeze, Logit, RealNVP, RealNVPTabular,
                              GaussianMixture)
  flowgmm_fast.FlowGMM     -- the model: flow + Gaussian-mixture prior (log_prob, bits_per_dim, predict, sample)
  flowgmm_fast.FlowGMMClassifier -- the scikit-learn estimator for tables (fit(X, y) with y == -1 unlabeled)
Backends ("torch" reference, "triton", "native", "auto"): set_backend / get_backend / use_backend /
available_backends, or the environment variable FLOWGMM_FAST_BACKEND. build_info() (and ``python -m flowgmm_fast``)
says how this installation was built and which backends run here.
"""

from . import debug, functional
from ._backend import (BackendUnavailableError, available_backends, get_backend, set_backend, unavailable_reason,
                       use_backend)
from ._info import build_info
from ._version import __version__
from . import nn
from .model import FlowGMM, FlowGMMOutput


def __getattr__(name):
    # the estimator imports scikit-learn: loaded on first use, so `import flowgmm_fast` does not pay for it
    if name == "FlowGMMClassifier":
        try:
            from .estimator import FlowGMMClassifier
        except ImportError as exc:
            raise ImportError(f"FlowGMMClassifier needs scikit-learn and safetensors ({exc}): "
                              "pip install 'flowgmm-fast[sklearn]'") from exc
        return FlowGMMClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FlowGMM", "FlowGMMOutput", "FlowGMMClassifier", "functional", "nn", "debug", "set_backend", "get_backend",
           "use_backend", "available_backends", "unavailable_reason", "BackendUnavailableError", "build_info",
           "__version__"]
