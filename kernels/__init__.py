"""Triton kernels and their launchers, installed as ``flowgmm_fast.kernels``.

Each module holds the ``@triton.jit`` kernels of one op family and the launcher functions that reshape, allocate,
pick block sizes and launch them. The custom ops with autograd live in :mod:`flowgmm_fast.ops.triton_ops`
(the "triton" backend); the layering is kernel -> launcher -> custom op -> :mod:`flowgmm_fast.functional` -> modules.

``coupling``  affine coupling fwd/reverse + backward: tanh-scale, mask (none / tensor / index checkerboard), exp,
              per-sample log-det added to the incoming sldj; backward recomputes from the inputs and reduces the
              per-channel scale gradient from per-tile partials (one launch per direction)
``squeeze``   2x2 squeeze / unsqueeze, both channel orders (one gather-scatter launch)
``logit``     dequantise + logit + per-sample log-det, and its backward (one launch per direction)
``gmm``       Gaussian-mixture log-densities tiled over D (isotropic or diagonal), log pi, logsumexp, labeled
              gather -> (nll, logits); backward for z, means, log_std, weight_logits. Never forms (B, K, D); K <= 128

Dtypes: float32, bfloat16 and float16 tensors are loaded and computed in fp32 and stored once in the input dtype;
log-dets, NLLs and logits are fp32. The launchers do not take float64 (the backend routes it to the reference).
Scalars are cast to fp32 inside the kernels; non-contiguous inputs are made contiguous by the launchers. Each launcher
runs with its input's CUDA device current (``_common.on_input_device``), so on that device's current stream. Offsets
that can pass 2^31 at sizes that fit one GPU are computed in int64 (``_common.partial_row``, the IDX64 constexprs). On
the CPU the same kernels run under the Triton interpreter (TRITON_INTERPRET=1, for tests).
"""
