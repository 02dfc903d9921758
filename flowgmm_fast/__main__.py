"""``python -m flowgmm_fast``: versions, build information, CUDA devices and each backend's status (``--json``)."""

from flowgmm_fast._info import main

raise SystemExit(main())
