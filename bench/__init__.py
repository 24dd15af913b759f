"""Benchmarks: the model, the pipeline, JPEG decoding and end-to-end serving.

One command per part (``python -m bench.model``, ``bench.pipeline``, ``bench.decode``,
``bench.serve``); each writes raw JSON to ``bench/results/<part>-<device>-<date>.json`` with the
device, versions and exact command line. ``BENCHMARKS.md`` at the repository root holds the tables.
"""
