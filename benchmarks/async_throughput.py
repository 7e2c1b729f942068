"""Updates per second of real asynchronous training, and what the momentum tuning costs in it.

A thin script that calls the benchmark's module,
:mod:`asyncmomentum.applications.benchmarks.async_throughput`, which ships in the wheel
(``asyncmomentum bench async_throughput`` runs it too). Options and output are its own:

    python benchmarks/async_throughput.py           # full run, a few minutes on 2 cores
    python benchmarks/async_throughput.py --quick   # fewer steps
"""

from asyncmomentum.applications.benchmarks.async_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
