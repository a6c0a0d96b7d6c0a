"""Side-by-side benchmarks: ours vs the PyTorch/HF peer in one process, reported as ratios.

Each module exposes `benchmark_*(...) -> list of rows`; a row is a dict with at least
`benchmark`, `metric`, `ours`, `pytorch`, `ratio` (ours / pytorch, higher is better for ours)
plus any extra fields (batch, model, MFU, bandwidth fraction ...). `scripts/benchmark.py`
runs them and prints one table. `models` holds the model configs they share, `timing` the
timer.
"""
