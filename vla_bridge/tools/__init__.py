"""Tools around the notebook: the benchmarks (``bench``, ``bench_train``; ``bench_all`` runs them all, ``ratios``
prints their goals) and the headless runner (``runner``).

Reached through ``python -m vla_bridge <command>``; nothing in the package imports them except ``__main__``.
"""
