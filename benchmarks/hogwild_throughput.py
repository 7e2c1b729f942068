"""Updates per second of Hogwild training, and what the momentum tuning costs in it.

A thin script that calls the benchmark's module,
:mod:`asyncmomentum.applications.benchmarks.hogwild_throughput`, which ships in the wheel
(``asyncmomentum bench hogwild_throughput`` runs it too). Options and output are its own:

    python benchmarks/hogwild_throughput.py           # full run: 600 steps per worker, 3 runs
    python benchmarks/hogwild_throughput.py --quick   # 150 steps per worker
"""

from asyncmomentum.applications.benchmarks.hogwild_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
