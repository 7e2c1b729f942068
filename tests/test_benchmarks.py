"""The benchmark scripts run and report what they claim to measure (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_overhead_runs_the_meter_and_the_stability_rule(capsys):
    step_overhead = load("step_overhead")
    args = ["--steps", "4", "--paths", "foreach", "--meter", "--rule", "stability", "--json"]
    args += ["--curvature-every", "2"]
    (result,) = step_overhead.main(args)
    assert result["rule"] == "stability" and result["meter"] is True
    assert result["ratio"] > 0 and math.isfinite(result["mean_ratio"])
    # The probe ran (the quadratic's curvatures are uniform in [0, 1)) and the rule set a
    # momentum within its bounds.
    assert 0.9 < result["curvature"] <= 1.0
    assert -0.9 <= result["algorithmic_momentum"] <= 0.9
    assert '"rule": "stability"' in capsys.readouterr().out
