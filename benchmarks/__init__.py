"""Benchmark suite: implicit_layers side by side with torchopt, torchdeq and jaxopt.

Run ``python -m benchmarks.run`` (add ``--tiny`` for a seconds-long smoke run).
"""
