"""Updates per second of the parameter server (digits CNN, 1, 2, 4 workers on loopback).

A thin script that calls the benchmark's module,
:mod:`asyncmomentum.applications.benchmarks.server_throughput`, which ships in the wheel
(``asyncmomentum bench server_throughput`` runs it too). Options and output are its own:

    python benchmarks/server_throughput.py           # full run: 600 updates per worker, 3 runs
    python benchmarks/server_throughput.py --quick   # 60 updates per worker, 3 runs
"""

from asyncmomentum.applications.benchmarks.server_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
