"""zmgpu benchmarks: real daemons on loopback, each figure printed as one JSON line beside the machine's own limit.

Run ``python -m bench`` (all benchmarks) or ``python -m bench latency`` (one);
``bench/README.md`` says what each figure means and gives the latest ones.
"""
