"""`unclip bench ...`: the benchmark against dalle2-pytorch (`benchmarks/run_all.py`)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from benchmarks import run_all

    return run_all.main(argv)
