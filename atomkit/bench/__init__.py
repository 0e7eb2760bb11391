"""Benchmarks: the reuse benchmark (ATOM vs the reload baseline), the decode benchmark, the library benchmark
and memory sampling. The library never imports this package."""
