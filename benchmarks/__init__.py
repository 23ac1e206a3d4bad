"""tidar-kernels benchmarks: ``python -m benchmarks --out DIR`` (see benchmarks/README.md)."""
