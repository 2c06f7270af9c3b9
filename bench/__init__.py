"""Benchmarks, run from the repository root as ``python -m bench.<area>.<name>``.

Areas: ``throughput`` (the original script's method against the core and the service), ``gpu``
(the same on a GPU with the 7B architecture), ``cpu`` (the model's kernels and their exactness),
``service`` (the server under load, its lanes, threads, batches, preprocessing and transfer),
``peers`` (side by side with vLLM), ``bulk`` (Ray Data bulk extraction). Each prints its table and
writes it to ``bench/results/`` (``bench/common.py``); ``python -m bench.render`` renders those
files as markdown tables.
"""
