"""The benchmarks that ``asyncmomentum bench`` runs, each a module with its own command line.

Each module has a ``main(argv)`` that parses its options, prints its figures and returns an exit
code, and runs as ``python -m asyncmomentum.applications.benchmarks.<name>``. They ship in the
wheel; the scripts in ``benchmarks/`` of the source tree only call these.

- :mod:`~asyncmomentum.applications.benchmarks.step_overhead`: step time against
  ``torch.optim.SGD``, side by side.
- :mod:`~asyncmomentum.applications.benchmarks.hogwild_throughput`: updates per second of
  Hogwild with 1, 2 and 4 processes (warm-up left out, 3 runs, the load beside), and the
  tuning's share of a step.
- :mod:`~asyncmomentum.applications.benchmarks.server_throughput`: updates per second of the
  parameter server, flat messages against per-tensor ones, with its CPU time and time shares.
- :mod:`~asyncmomentum.applications.benchmarks.convergence`: steps to a target loss of each
  tuning rule, relative to the oracle.
"""
