"""lvsa's benchmarks, run as modules from the repository root (with lvsa installed, ``pip install -e .``):
``python -m benchmarks.attention``, ``python -m benchmarks.pipeline``, ... (``benchmarks/gpu.sh`` holds the
recorded GPU commands). Each times dense and sparse in the same run and prints the ratios."""
