"""Attention drivers shipped with lvsa (``lvsa.backends``); others come from third-party entry points."""
