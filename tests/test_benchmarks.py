"""The benchmarks run and report what they claim to measure (no timing is asserted)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import pkgutil
import sys
from pathlib import Path

import pytest

from asyncmomentum.applications import bench, benchmarks
from asyncmomentum.applications.benchmarks import server_throughput, step_overhead

SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_step_overhead_runs_the_meter_and_the_stability_rule(capsys):
    args = ["--steps", "4", "--paths", "foreach", "--meter", "--rule", "stability", "--json"]
    args += ["--curvature-every", "2"]
    (result,) = step_overhead.run(args)
    assert result["rule"] == "stability"
    assert result["meter"] is True
    assert result["ratio"] > 0
    assert math.isfinite(result["mean_ratio"])
    # The probe ran (the quadratic's curvatures are uniform in [0, 1)) and the rule set a
    # momentum within its bounds.
    assert 0.9 < result["curvature"] <= 1.0
    assert -0.9 <= result["algorithmic_momentum"] <= 0.9
    assert '"rule": "stability"' in capsys.readouterr().out


def test_step_overhead_offers_every_path_and_runs_them_all_by_default(capsys):
    # "default" passes nothing: each optimizer makes its own choice of path.
    assert step_overhead.PATHS == {
        "foreach": {"foreach": True},
        "fused": {"fused": True},
        "single": {"foreach": False},
        "default": {},
    }
    assert step_overhead.build_parser().parse_args([]).paths == list(step_overhead.PATHS)
    assert step_overhead.main(["--steps", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["path", "AsyncMomentumSGD"]
    assert "ratio" in table[1]
    assert [line.split()[0] for line in table[2:]] == list(step_overhead.PATHS)


def test_server_throughput_times_both_transports_after_the_warm_up(capsys):
    args = ["--updates", "6", "--runs", "1", "--workers", "1", "--json", "--quick"]
    summaries = server_throughput.run(args)
    jobs, links = summaries[:2], summaries[2:]
    assert [(s["transport"], s["workers"]) for s in jobs] == [("c10d", 1), ("rpc", 1)]
    for summary in jobs:
        assert summary["fewest_share"] == summary["most_share"] == 1.0  # one worker
        rate = summary["updates_per_second"]
        assert 0 < rate["min"] <= rate["median"] <= rate["max"]
        assert summary["measured_updates"] == 6  # the warm-up's updates are not timed
        assert summary["cpu_ms_per_update"] > 0
        assert sum(summary["shares"].values()) == pytest.approx(1.0)
        assert len(summary["load"]) == 2
    assert [s["transport"] for s in links] == ["c10d", "rpc"]
    for link in links:
        assert link["round_trip_us"] > 0
        assert link["idle_worker_cpu"] >= 0
        assert link["idle_server_cpu"] >= 0
    out = capsys.readouterr().out
    assert "load average now" in out
    assert "1 workers: c10d / rpc updates/s" in out
    assert "c10d / rpc: round trip" in out


def test_bench_runs_exactly_the_benchmark_modules_of_the_package():
    modules = {info.name for info in pkgutil.iter_modules(benchmarks.__path__)}
    assert modules == set(bench.BENCHMARKS)
    for name in bench.BENCHMARKS:
        module = importlib.import_module(f"{benchmarks.__name__}.{name}")
        assert callable(module.main)
        assert callable(module.build_parser)
        assert bench.bench_command(name, quick=True)[:3] == [sys.executable, "-m", module.__name__]


def _script(name: str):
    """The script ``benchmarks/<name>.py`` as a module (its ``__main__`` guard keeps it idle)."""
    spec = importlib.util.spec_from_file_location(
        f"benchmark_script_{name}", SCRIPTS / f"{name}.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("name", sorted(bench.BENCHMARKS))
def test_each_script_is_a_thin_caller_of_the_package_module(name: str):
    script = _script(name)
    assert script.main is importlib.import_module(f"{benchmarks.__name__}.{name}").main


def test_every_benchmark_has_a_quick_form():
    for name in bench.BENCHMARKS:
        assert bench.BENCHMARKS[name], f"{name} has no --quick arguments"
        parser = importlib.import_module(f"{benchmarks.__name__}.{name}").build_parser()
        parser.parse_args(bench.BENCHMARKS[name])  # the quick arguments are its own


@pytest.mark.slow
def test_bench_quick_runs_every_benchmark_in_minutes():
    # What `asyncmomentum bench --quick` runs, as a user would, in fresh interpreters.
    import subprocess
    import time

    for name in bench.BENCHMARKS:
        started = time.perf_counter()
        done = subprocess.run(
            bench.bench_command(name, quick=True), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
        assert time.perf_counter() - started < 180, f"{name} --quick is not quick"


def test_charlm_edge_hands_the_momentum_over_at_the_update_asked(monkeypatch):
    from asyncmomentum.core.tuning import rules

    # The script registers its rules: in a copy of the registry, which the test then drops.
    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))
    script = _script("charlm_edge")
    RULES = rules.RULES
    late = RULES[script.handing_over(-0.9, 4, oracle_first=False)]()
    early = RULES[script.handing_over(-0.9, 4, oracle_first=True)]()
    plain = RULES["auto"]()
    for update in range(1, 7):
        momenta = [r.algorithmic_momentum(0.9, 0.5) for r in (late, early, plain)]
        if update < 4:
            assert momenta[0] == momenta[2] != -0.9
            assert momenta[1] == -0.9
        else:
            assert momenta[0] == -0.9
            assert momenta[1] == momenta[2] != -0.9
        for rule in (late, early, plain):
            rule.observe(3)  # the update is applied, three updates stale


def test_rule_acceptance_takes_each_cells_oracle_from_a_recorded_table(tmp_path):
    acceptance = _script("rule_acceptance")
    table = tmp_path / "table.md"
    table.write_text(
        "### quadratic: lr 0.25, cap 1000 steps\n\n"
        "| staleness | M | oracle mom. | within 10% | oracle steps | fixed 0.9 |\n"
        "|---|---|---|---|---|---|\n"
        "| geometric | 2 | 0.8 | 0.8 | 110 | div (>=9.09) |\n"
        "| round_robin | 16 | none | - | - | div |\n\n"
        "### Oracle momentum against M\n\n"
        "| quadratic | geometric | 1: 0.9 | -0.97 |\n",
        encoding="utf-8",
    )
    oracle = acceptance.oracle_from_table(table)
    assert oracle == {("quadratic", "geometric", 2): 110.0, ("quadratic", "round_robin", 16): None}
    stats = {"steps": 220.0, "ratio": 0.5, "converged": True, "diverged_runs": 0}
    cells = [
        {
            "problem": p,
            "staleness": s,
            "workers": m,
            "oracle_steps": 440.0,
            "methods": {"auto": stats},
        }
        for p, s, m in (
            ("quadratic", "geometric", 2),
            ("quadratic", "round_robin", 16),
            ("gru", "geometric", 2),
        )
    ]
    judged = acceptance.with_oracle_from(cells, oracle)
    assert [c["workers"] for c in judged] == [2, 16]  # a cell the table lacks is left out
    assert judged[0]["oracle_steps"] == 110.0
    assert judged[0]["methods"]["auto"]["ratio"] == 2.0
    assert judged[1]["methods"]["auto"]["ratio"] is None
    # The repository's own table reads, every problem of the sweep in it.
    recorded = acceptance.oracle_from_table(SCRIPTS.parent / "docs" / "sweep-full-auto-table.md")
    assert {problem for problem, _, _ in recorded} == {
        "quadratic",
        "softmax",
        "cnn",
        "resnet",
        "charlm",
        "gru",
    }
    empty = tmp_path / "empty.md"
    empty.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no cell"):
        acceptance.oracle_from_table(empty)
