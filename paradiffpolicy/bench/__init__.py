"""Benchmark commands, ``python -m paradiffpolicy.bench.<name>``: ``sampler``, ``backends``,
``iterations``, ``frontier``, ``delay``, ``serve``, ``compare_checkpoints``. Results and their history
live in ``benchmarks/``; nothing in the library imports this package."""
