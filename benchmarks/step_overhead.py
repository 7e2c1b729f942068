"""Step time of AsyncMomentumSGD against torch.optim.SGD, measured side by side in one run.

A thin script that calls the benchmark's module,
:mod:`asyncmomentum.applications.benchmarks.step_overhead`, which ships in the wheel
(``asyncmomentum bench step_overhead`` runs it too). Options and output are its own:

    python benchmarks/step_overhead.py            # every path: foreach, fused, single, default
    python benchmarks/step_overhead.py --steps 200 --paths foreach
    python benchmarks/step_overhead.py --meter --rule stability
"""

from asyncmomentum.applications.benchmarks.step_overhead import main

if __name__ == "__main__":
    raise SystemExit(main())
