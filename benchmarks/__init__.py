"""Benchmarks of torchrunx against torchrunx 0.4.0 and torchrun; see README.md in this folder.

The driver runs as ``python3 -m benchmarks.compare`` (``bash benchmarks/run.sh``); the scenario
processes run ``scenario.py`` as a script.
"""
