"""Benchmarks: this project against dalle2-pytorch (`make bench` / `unclip bench`), data throughput."""
