"""`hf-fastslow bench`: one front door to the benchmark scripts in benchmarks/ (issue 17).

`registry` says, per method, which script measures it, against which peer, with which quick/full arguments and where
its headline sits in the script's JSON; `runner` runs the chosen entries as subprocesses and gathers one table and one
JSON report; `cli` registers the verb. Standard library only at import time.
"""

from hf_fastslow.bench.registry import ENTRIES, BenchEntry, Figure, Output, entries_by_method, resolve

__all__ = ["ENTRIES", "BenchEntry", "Figure", "Output", "entries_by_method", "resolve"]
