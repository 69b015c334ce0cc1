"""Device modules shipped with lvsa (``lvsa.devices``); others come from third-party entry points."""
