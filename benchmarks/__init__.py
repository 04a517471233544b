"""Benchmarks for derive's generated backward code and for the cost of deriving it.

Run ``python -m benchmarks`` (``make bench``); ``--quick`` for a smoke run, ``--clock cpu`` on a shared
machine, ``--help`` for options. Modules: ``cases`` (what is timed), ``runtime`` (timing and memory of one
case), ``derivation_cost`` (stage timings per op and the k-layer growth study), ``tables`` (Markdown/JSON),
``cli`` (the command line).
"""
