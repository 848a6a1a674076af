"""guppy's benchmark suites: `python -m bench step | train | kernels` (see bench/__main__.py)."""
