"""Op implementations, one module per backend, all with the signatures documented in :mod:`.reference`.

``reference``   pure PyTorch, the ground truth ("torch" backend)
``triton_ops``  torch.library custom ops over the Triton kernels in :mod:`flowgmm_fast.kernels` ("triton")
``native_ops``  torch.library custom ops over the compiled extension :mod:`flowgmm_fast._C` ("native")

Backends are imported lazily by :mod:`flowgmm_fast._backend` the first time they are asked for.
"""
