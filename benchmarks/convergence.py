"""Convergence benchmark: steps to a target loss of each tuning rule, relative to the oracle.

A thin script that calls the benchmark's module,
:mod:`asyncmomentum.applications.benchmarks.convergence`, which ships in the wheel
(``asyncmomentum bench convergence`` runs it too). Options and output are its own:

    python benchmarks/convergence.py                      # --quick size, all cores
    python benchmarks/convergence.py --jobs 2 --out DIR   # choose the workers and the cache
    python benchmarks/convergence.py --full               # the full sweep (about an hour)
"""

from asyncmomentum.applications.benchmarks.convergence import main

if __name__ == "__main__":
    raise SystemExit(main())
