"""Benchmarks for graddiag: ``make bench`` (``python -m bench.run_all``) runs every registered one.

Each benchmark is a module with ``main(argv: list[str] | None) -> int`` that writes its figures to
``bench/results/<name>.json`` and ``bench/results/<name>.md``; :mod:`bench.run_all` lists them.
"""
