"""The sweep: single runs, learning-rate choice, oracle and ratios, caching, outputs, the CLI."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import statistics

import pytest
import torch
from conftest import calibration_run

from asyncmomentum.applications.problems import PROBLEMS, get_problem
from asyncmomentum.applications.sweep import (
    FULL,
    QUICK,
    RunCache,
    RunResult,
    RunSpec,
    SweepError,
    SweepOutputError,
    choose_learning_rate,
    format_summary,
    kendall_tau,
    register,
    run_one,
    run_sweep,
)
from asyncmomentum.applications.sweep import report as report_module
from asyncmomentum.applications.sweep.analysis import (
    build_cells,
    is_design_cell,
    summarize,
    worst_ratio,
)
from asyncmomentum.applications.sweep.cache import CACHE_NAME
from asyncmomentum.applications.sweep.report import (
    CSV_NAME,
    FIGURE_NAME,
    METER_FIGURE_NAME,
    SUMMARY_NAME,
    TABLE_NAME,
)
from asyncmomentum.core import formulas
from asyncmomentum.core.tuning import rules
from asyncmomentum.runtimes.simulate import STALENESS_MODELS

OUTPUTS = (CSV_NAME, TABLE_NAME, FIGURE_NAME, METER_FIGURE_NAME, SUMMARY_NAME)

#: The quadratic with a loose target (10% of the initial loss), three learning rates and a low
#: cap: its runs take tens to hundreds of steps. Only the parent process reads these fields (a
#: run's spec carries target and cap), so worker processes need no patching.
SMALL_QUADRATIC = dataclasses.replace(
    PROBLEMS["quadratic"], target_loss=1.0, lr_grid=(0.25, 0.5, 1.0), max_steps=300
)

#: A sweep of seconds, and exactly what ``TINY_ARGS`` ask for on the command line.
TINY = FULL.with_changes(
    problems=("quadratic",),
    staleness_models=("geometric", "round_robin"),
    workers=(1, 8),
    momenta=(0.0, 0.5, 0.9),
    seeds=2,
    meter_workers=(),
)
TINY_ARGS = [
    "--problems", "quadratic", "--staleness", "geometric,round_robin", "--workers", "1,8",
    "--momenta", "0,0.5,0.9", "--seeds", "2", "--jobs", "1", "--no-progress", "--no-meter",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def small_quadratic():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PROBLEMS, "quadratic", SMALL_QUADRATIC)
        yield


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The runs are tiny: threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quadratic_spec(**changes) -> RunSpec:
    problem = get_problem("quadratic")
    fields = {
        "problem": "quadratic",
        "staleness": "geometric",
        "workers": 4,
        "method": "fixed",
        "momentum": 0.5,
        "lr": 0.125,
        "seed": 0,
        "target_loss": problem.target_loss,
        "max_steps": 1000,
        "eval_every": problem.eval_every,
    }
    fields.update(changes)
    return RunSpec(**fields)


def without_timing(result: RunResult) -> dict:
    return {k: v for k, v in result.to_dict().items() if k not in ("seconds", "cpu_seconds")}


def expected_rows(config) -> int:
    """Learning-rate runs plus grid runs (cells x (fixed momenta + rules) x seeds)."""
    lr_runs = sum(len(get_problem(p).lr_grid) for p in config.problems) * config.seeds
    methods = len(config.fixed_momenta) + len(config.rule_names)
    cells = sum(len(config.cells(p)) for p in config.problems)
    return lr_runs + cells * methods * config.seeds


# -- single runs ----------------------------------------------------------------------------------


def test_run_reaches_the_target_and_repeats_bit_for_bit():
    spec = quadratic_spec()
    first, second = run_one(spec), run_one(spec)
    assert first.status == "converged"
    assert first.final_loss <= spec.target_loss < first.initial_loss
    assert first.steps % spec.eval_every == 0
    assert 0 < first.steps < spec.max_steps
    assert first.mean_algorithmic_momentum == pytest.approx(0.5)
    assert without_timing(first) == without_timing(second)


def test_too_large_a_learning_rate_is_flagged_as_divergence_early():
    spec = quadratic_spec(lr=8.0, momentum=0.9)
    result = run_one(spec)
    assert result.status == "diverged"
    assert result.steps < spec.max_steps
    assert not result.final_loss <= 10 * result.initial_loss


def test_a_run_that_misses_the_target_stops_at_the_cap():
    spec = quadratic_spec(momentum=0.0, max_steps=20)
    result = run_one(spec)
    assert result.status == "capped"
    assert result.steps == spec.max_steps
    assert spec.target_loss < result.final_loss < result.initial_loss


def test_a_rule_estimates_the_workers_from_the_staleness_it_is_told():
    spec = quadratic_spec(
        workers=8, method="rule:additive", momentum=0.9, max_steps=300, target_loss=0.0
    )
    result = run_one(spec)
    assert 6.0 < result.final_estimated_workers < 10.0  # M_hat = 1 + mean staleness
    applied = rules.algorithmic_momentum(0.9, formulas.implicit_momentum(8), "additive")
    assert abs(result.mean_algorithmic_momentum - applied) < 0.2


def test_one_worker_is_the_same_run_under_every_staleness_model():
    # The sweep simulates M = 1 once and reports it under every model: this is why it may.
    results = [
        without_timing(run_one(quadratic_spec(staleness=model, workers=1, max_steps=60)))
        for model in STALENESS_MODELS
    ]
    assert all(result == results[0] for result in results[1:])


# -- learning rate, oracle, ratios ----------------------------------------------------------------


def fake(status: str, steps: int, momentum: float = 0.0) -> RunResult:
    return RunResult(status, steps, 1.0, 0.1, momentum, 1.0, 0.0)


def test_learning_rate_is_the_fastest_that_converges_for_every_seed_times_the_safety():
    spec = quadratic_spec(workers=1, momentum=0.9, max_steps=500)
    runs = []
    outcomes = {
        0.1: [("converged", 200), ("converged", 220), ("converged", 190)],
        0.2: [("converged", 120), ("converged", 130), ("converged", 110)],
        0.4: [("converged", 60), ("capped", 500), ("converged", 70)],  # fastest median, one miss
    }
    for lr, seeds in outcomes.items():
        for seed, (status, steps) in enumerate(seeds):
            runs.append((dataclasses.replace(spec, lr=lr, seed=seed), fake(status, steps)))
    choice = choose_learning_rate("quadratic", runs, safety=0.25)
    assert choice.fastest == 0.2
    assert choice.lr == pytest.approx(0.05)
    assert choice.median_steps[0.4] == 70
    assert not choice.all_converged[0.4]


def test_no_converging_learning_rate_is_a_clear_error():
    spec = quadratic_spec(workers=1, max_steps=50)
    runs = [(dataclasses.replace(spec, seed=s), fake("capped", 50)) for s in range(2)]
    with pytest.raises(SweepError, match=r"lr_grid.*max_steps"):
        choose_learning_rate("quadratic", runs, safety=0.25)


def test_oracle_ratios_and_geometric_mean_follow_their_definitions():
    spec = quadratic_spec(max_steps=1000)
    table = {  # method, momentum -> per-seed (status, steps)
        ("fixed", 0.0): [("converged", 400), ("converged", 420), ("converged", 380)],
        ("fixed", 0.5): [("converged", 200), ("converged", 210), ("diverged", 30)],
        ("fixed", 0.8): [("converged", 100), ("diverged", 40), ("diverged", 20)],  # minority
        ("fixed", 0.9): [("converged", 210), ("converged", 200), ("converged", 250)],
        ("rule:additive", 0.9): [("converged", 300), ("converged", 330), ("converged", 270)],
    }
    runs = []
    for (method, momentum), seeds in table.items():
        for seed, (status, steps) in enumerate(seeds):
            run = dataclasses.replace(spec, method=method, momentum=momentum, seed=seed)
            runs.append(("geometric", run, fake(status, steps, momentum)))
    (cell,) = build_cells(runs, grid=(0.0, 0.5, 0.8, 0.9))
    # 0.8 is fastest on its one converged seed but converges for a minority only; 0.5 and 0.9
    # both have median 210 (a diverged seed counts as the cap); 0.9's mean is lower.
    assert cell.oracle is not None
    assert cell.oracle.momentum == 0.9
    assert cell.oracle.median == 210
    assert cell.near_optimal == (0.5, 0.9)
    assert cell.ratio(cell.rules["additive"]) == pytest.approx(300 / 210)
    assert cell.fixed[0.5].diverged == 1

    summaries = {s.label: s for s in summarize([cell, cell], baseline=0.9)}
    assert summaries["additive"].geomean_ratio == pytest.approx(300 / 210)
    assert summaries["fixed 0.9"].geomean_ratio == pytest.approx(1.0)
    assert summaries["additive"].cells == 2
    assert summaries["additive"].runs == 6


def test_a_cell_where_no_grid_momentum_converges_has_no_oracle_and_no_ratio():
    spec = quadratic_spec(max_steps=100)
    runs = [
        ("geometric", dataclasses.replace(spec, momentum=m, seed=s), fake("diverged", 10))
        for m in (0.5, 0.9)
        for s in range(3)
    ]
    (cell,) = build_cells(runs, grid=(0.5, 0.9))
    assert cell.oracle is None
    assert cell.near_optimal == ()
    assert cell.ratio(cell.fixed[0.9]) is None
    (baseline,) = summarize([cell], baseline=0.9)
    assert baseline.cells == 0
    assert math.isnan(baseline.geomean_ratio)
    assert baseline.diverged_runs == 3


def test_kendall_tau_signs_the_trend():
    assert kendall_tau([1, 2, 4, 8], [0.9, 0.8, 0.5, 0.0]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 4, 8], [0.0, 0.5, 0.8, 0.9]) == pytest.approx(1.0)
    assert -1.0 < kendall_tau([1, 2, 4, 8], [0.9, 0.9, 0.5, 0.5]) < 0.0  # ties
    assert math.isnan(kendall_tau([1, 2, 4], [0.5, 0.5, 0.5]))


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"problems": ("nope",)}, r"problems: unknown \['nope'\]"),
        ({"workers": (0, 4)}, r"workers must be integers >= 1"),
        ({"momenta": (0.5, 1.0)}, r"momentum of the grid.*\(-1, 1\)"),
        ({"seeds": 0}, r"seeds must be an integer >= 1"),
        ({"rules": ("nope",)}, r"rules: unknown"),
        ({"lr_safety": 0.0}, r"lr_safety"),
        ({"max_steps": 0}, r"max_steps must be an integer > 0 or None"),
    ],
)
def test_bad_configuration_is_refused_with_the_reason(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.with_changes(**changes)


def test_grid_and_worker_counts_are_kept_sorted_and_once():
    config = TINY.with_changes(momenta=(0.9, 0.0, 0.9, -0.5), workers=(8, 1, 8))
    assert config.momenta == (-0.5, 0.0, 0.9)
    assert config.cells("quadratic") == [
        (model, m) for model in TINY.staleness_models for m in (1, 8)
    ]


def test_quick_sweep_refuses_a_selection_that_leaves_a_problem_without_cells():
    with pytest.raises(ValueError, match=r"problem 'cnn' has no cell to run.*M in \[1, 4, 16\]"):
        QUICK.with_changes(workers=(2, 8))
    assert QUICK.with_changes(problems=("quadratic",), workers=(2, 8)).cells("quadratic")


# -- the sweep end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, run_sweep(TINY, out, jobs=1)
    finally:
        torch.set_num_threads(threads)


def test_sweep_writes_the_csv_the_table_the_summary_and_the_figure(tiny_sweep):
    out, result = tiny_sweep
    assert {path.name for path in out.iterdir()} == {*OUTPUTS, CACHE_NAME}
    with (out / CSV_NAME).open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == expected_rows(TINY) == len(result.rows)
    grid_rows = [row for row in rows if row["phase"] == "grid"]
    assert {row["method"] for row in grid_rows} == {"fixed", *rules.rule_names()}
    assert {row["staleness"] for row in grid_rows} == set(TINY.staleness_models)
    assert {row["status"] for row in rows} <= {"converged", "capped", "diverged"}
    chosen = result.learning_rates["quadratic"]
    assert {float(row["lr"]) for row in grid_rows} == {chosen.lr}
    assert chosen.lr == pytest.approx(TINY.lr_safety * chosen.fastest)

    table = (out / TABLE_NAME).read_text()
    for label in ("fixed 0.9", *rules.rule_names(), "round_robin", "Kendall tau"):
        assert label in table
    summary = json.loads((out / SUMMARY_NAME).read_text(), parse_constant=reject_non_json)
    assert {s["label"] for s in summary["summaries"]} == {"fixed 0.9", *rules.rule_names()}
    assert len(summary["cells"]) == len(TINY.staleness_models) * len(TINY.workers)
    assert (out / FIGURE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweep_checks_the_momentum_meter_against_the_queuing_model(tmp_path):
    config = TINY.with_changes(
        staleness_models=("geometric",),
        workers=(1,),
        seeds=1,
        meter_workers=(1, 4),
        meter_steps=400,
    )
    result = run_sweep(config, tmp_path, jobs=1)
    meter_rows = [row for row in result.rows if row["phase"] == "meter"]
    # M = 1 with momenta 0, 0.5 and 0.9; M = 4 with momentum 0; run to the cap, not the target.
    assert {(r["workers"], r["momentum"]) for r in meter_rows} == {
        (1, 0.0),
        (1, 0.5),
        (1, 0.9),
        (4, 0.0),
    }
    assert all(r["steps"] == 400 and r["status"] == "capped" for r in meter_rows)
    assert all(
        r["staleness"] == ("exponential" if r["workers"] > 1 else "geometric") for r in meter_rows
    )
    points = {(p.workers, p.momentum): p for p in result.meter}
    assert points[(4, 0.0)].predicted == pytest.approx(0.75)
    assert points[(1, 0.9)].predicted == pytest.approx(0.9)
    for point in result.meter:
        assert point.readings == 1
        assert point.within, point  # the tolerances: 0.1 under asynchrony, 0.03 without
    table = (tmp_path / TABLE_NAME).read_text()
    assert "Momentum meter: measured against predicted" in table
    summary = json.loads((tmp_path / SUMMARY_NAME).read_text(), parse_constant=reject_non_json)
    assert len(summary["meter"]) == 4
    assert all(p["within"] for p in summary["meter"])
    assert (tmp_path / METER_FIGURE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def reject_non_json(constant: str) -> None:
    raise AssertionError(f"summary.json holds {constant}, which strict JSON parsers refuse")


def test_the_oracle_of_each_cell_is_the_best_converging_grid_momentum(tiny_sweep):
    _, result = tiny_sweep
    assert any(cell.oracle is not None for cell in result.cells)
    for cell in result.cells:
        converging = [cell.fixed[m] for m in TINY.momenta if cell.fixed[m].converged]
        if not converging:
            assert cell.oracle is None
            continue
        assert cell.oracle.median == min(s.median for s in converging)
        rows = [
            r
            for r in result.rows
            if r["phase"] == "grid"
            and r["staleness"] == cell.staleness
            and r["workers"] == cell.workers
            and r["method"] == "fixed"
            and r["momentum"] == cell.oracle.momentum
        ]
        assert cell.oracle.median == statistics.median(r["cost"] for r in rows)


def test_a_rerun_computes_nothing_and_gives_the_same_rows(tiny_sweep):
    out, first = tiny_sweep
    again = run_sweep(TINY, out, jobs=1)
    assert again.computed == 0
    assert again.cached == first.computed + first.cached
    assert again.rows == first.rows


def test_a_rerun_computes_exactly_what_the_cache_lost(tiny_sweep, tmp_path):
    out, first = tiny_sweep
    lines = (out / CACHE_NAME).read_text().splitlines(keepends=True)
    (tmp_path / CACHE_NAME).write_text("".join(lines[:-2]) + lines[-1][:25])  # the last cut
    assert RunCache(tmp_path).skipped_lines == 1
    again = run_sweep(TINY, tmp_path, jobs=1)
    assert again.computed == 2
    assert [without_timing_row(r) for r in again.rows] == [
        without_timing_row(r) for r in first.rows
    ]


def without_timing_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("seconds", "cpu_seconds")}


def test_worker_processes_give_the_same_results_as_one_process(tiny_sweep):
    _, serial = tiny_sweep
    config = TINY.with_changes(staleness_models=("geometric",), workers=(8,))
    parallel = run_sweep(config, None, jobs=2)
    assert parallel.computed == expected_rows(config)
    by_key = {row_key(row): without_timing_row(row) for row in serial.rows}
    assert [without_timing_row(row) for row in parallel.rows] == [
        by_key[row_key(row)] for row in parallel.rows
    ]


def row_key(row: dict) -> tuple:
    return tuple(
        row[k] for k in ("phase", "staleness", "workers", "method", "momentum", "lr", "seed")
    )


def copy_cache(source, target):
    target.mkdir(exist_ok=True)
    (target / CACHE_NAME).write_bytes((source / CACHE_NAME).read_bytes())
    return target


def test_a_new_rule_joins_the_sweep_without_changing_it(monkeypatch, tiny_sweep, tmp_path):
    class Halved(rules.TuningRule):
        name = "halved"

        def algorithmic_momentum(self, target, implicit, *, lr=None, bounds=(-0.9, 0.99)):
            return formulas.clip_momentum(0.5 * (target - implicit), bounds)

        def total_momentum(self, algorithmic, implicit):
            return 2.0 * algorithmic + implicit

    monkeypatch.setitem(rules.RULES, "halved", Halved)
    out = copy_cache(tiny_sweep[0], tmp_path / "sweep")  # only the new rule's runs are missing
    config = TINY.with_changes(staleness_models=("geometric",), workers=(8,), momenta=(0.5,))
    result = run_sweep(config, out, jobs=1)
    assert result.computed == config.seeds
    assert "halved" in {row["method"] for row in result.rows}
    assert "halved" in {s.label for s in result.summaries}
    assert "halved" in (out / TABLE_NAME).read_text()


def test_a_rule_whose_revision_changes_recomputes_its_runs_only(monkeypatch, tiny_sweep, tmp_path):
    out = copy_cache(tiny_sweep[0], tmp_path / "sweep")
    config = TINY.with_changes(staleness_models=("geometric",), workers=(8,), momenta=(0.5,))
    assert run_sweep(config, out, jobs=1).computed == 0  # everything is in the cache
    rule = config.rule_names[0]
    monkeypatch.setattr(rules.rule_class(rule), "revision", rules.rule_class(rule).revision + 1)
    # The changed rule's runs are computed again; the other rules' and the fixed runs are not.
    assert run_sweep(config, out, jobs=1).computed == config.seeds


def test_a_failure_while_writing_leaves_no_output_half_written(monkeypatch, tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    before = {name: (out / name).read_bytes() for name in OUTPUTS}

    def broken_plot(result, path):
        path.write_bytes(b"half a figure")
        raise RuntimeError("the figure failed")

    monkeypatch.setattr(report_module, "plot_oracle", broken_plot)
    with pytest.raises(RuntimeError, match="the figure failed"):
        run_sweep(TINY, out, jobs=1)
    # The previous, complete outputs are untouched, and no staging directory is left.
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    assert {path.name for path in out.iterdir()} == {*OUTPUTS, CACHE_NAME}

    fresh = copy_cache(out, tmp_path / "fresh")
    with pytest.raises(RuntimeError, match="the figure failed"):
        run_sweep(TINY, fresh, jobs=1)
    assert {path.name for path in fresh.iterdir()} == {CACHE_NAME}


# -- the command line -----------------------------------------------------------------------------


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncmomentum")
    register(parser.add_subparsers(dest="command"))
    return parser


def run_cli(argv: list[str]) -> int:
    args = sweep_parser().parse_args(["sweep", *argv])
    return args.handler(args)


def test_cli_runs_the_sweep_and_prints_the_table(tiny_sweep, tmp_path, capsys):
    source, result = tiny_sweep
    # The CLI asks for the same sweep as TINY: with TINY's cache minus its last two runs, it
    # computes those two and reads the rest.
    lines = (source / CACHE_NAME).read_text().splitlines(keepends=True)
    (tmp_path / CACHE_NAME).write_text("".join(lines[:-2]))
    assert run_cli([*TINY_ARGS, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| round_robin | 8 |" in printed
    assert "Kendall tau" in printed
    assert f"2 runs computed, {len(lines) - 2} from the cache" in printed
    assert {path.name for path in tmp_path.iterdir()} == {*OUTPUTS, CACHE_NAME}
    with (tmp_path / CSV_NAME).open() as file:
        assert [without_timing_row(r) for r in csv.DictReader(file)] == [
            {k: "" if v is None else str(v) for k, v in without_timing_row(r).items()}
            for r in result.rows
        ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--jobs", "0"], r"--jobs: expected an integer >= 1, got 0"),
        (["--problems", "imagenet"], r"--problems: unknown 'imagenet'; choose from quadratic"),
        (["--staleness", "poisson"], r"--staleness: unknown 'poisson'"),
        (["--workers", "4,x"], r"--workers: expected an integer >= 1, got 'x'"),
        (["--momenta", "0.5,1.2"], r"--momenta: momentum must lie in the open interval"),
        (["--seeds", "-1"], r"--seeds: expected an integer >= 1"),
        (["--lr-safety", "2"], r"--lr-safety: expected a number in \(0, 1\], got 2.0"),
        (["--rules", "additive,stabilty"], r"--rules: unknown 'stabilty'; choose from additive"),
    ],
)
def test_cli_bad_argument_exits_2_with_the_reason(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert _matches(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cli_rules_and_no_meter_select_what_runs():
    from asyncmomentum.applications.sweep.command import config_from_args

    args = sweep_parser().parse_args(["sweep", "--quick", "--rules", "stability,additive"])
    assert config_from_args(args).rule_names == ("stability", "additive")
    assert config_from_args(args).meter_workers == QUICK.meter_workers
    args = sweep_parser().parse_args(["sweep", "--no-meter"])
    assert config_from_args(args).meter_workers == ()
    assert config_from_args(args).rule_names == rules.rule_names()


def _matches(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_cli_unwritable_out_exits_2_before_running_anything(where, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker if where == "a file" else blocker / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*TINY_ARGS, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write the sweep's output to" in err
    assert "--out" in err
    reason = "exists and is not a folder" if where == "a file" else "is a file, so no folder"
    assert reason in err
    assert blocker.read_text() == "not a directory"
    assert [path.name for path in tmp_path.iterdir()] == ["blocker"]


def test_cli_a_sweep_that_cannot_converge_exits_1_with_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PROBLEMS, "quadratic", dataclasses.replace(SMALL_QUADRATIC, max_steps=5))
    assert run_cli([*TINY_ARGS, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no learning rate of quadratic's lr_grid" in err
    assert "widen lr_grid" in err
    assert {path.name for path in tmp_path.iterdir()} == {CACHE_NAME}  # the runs it finished


def test_a_failing_disk_while_writing_is_a_clear_error(monkeypatch, tiny_sweep, tmp_path):
    def full_disk(rows, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module, "write_csv", full_disk)
    out = copy_cache(tiny_sweep[0], tmp_path / "sweep")
    with pytest.raises(SweepOutputError, match=r"could not write .* No space left on device"):
        run_sweep(TINY, out, jobs=1)
    assert {path.name for path in out.iterdir()} == {CACHE_NAME}


@pytest.mark.parametrize("name", ["resnet", "charlm"])
def test_the_deeper_problems_learn_and_are_budgeted_like_the_cnn(name):
    problem = get_problem(name)
    result = calibration_run(name)
    # Calibrated to reach the target in tens of updates at M = 1 (problems.py's docstring).
    assert result.status == "converged"
    assert 10 <= result.steps <= 200
    assert result.initial_loss > problem.target_loss
    assert QUICK.cells(name) == [("geometric", 1), ("geometric", 4), ("geometric", 16)]
    assert {model for model, _ in FULL.cells(name)} == {"geometric", "round_robin"}


def test_the_summary_reports_the_design_half_and_the_held_back_half_apart(tiny_sweep):
    _, result = tiny_sweep
    design = [cell for cell in result.cells if is_design_cell(cell)]
    held_back = [cell for cell in result.cells if not is_design_cell(cell)]
    # The quadratic at M = 8 is in the design half, M = 1 is held back.
    assert {cell.workers for cell in design} == {8}
    assert {cell.workers for cell in held_back} == {1}
    text = format_summary(result)
    section = text[text.index("### Design half and held-back half") :]
    for rule in rules.rule_names():
        row = next(line for line in section.splitlines() if line.startswith(f"| {rule} |"))
        assert row.count("|") == 6
    # The worst cell is the largest ratio to the oracle over the half.
    ratios = [cell.ratio(cell.rules["additive"]) for cell in design]
    assert worst_ratio(design, "additive") == max(r for r in ratios if r is not None)


# -- a run that raises ----------------------------------------------------------------------------


class Broken(rules.TuningRule):
    """A rule whose every run raises (a bug in a new rule, say), only under asynchrony."""

    name = "broken"

    def algorithmic_momentum(self, target, implicit, *, lr=None, bounds=(-0.9, 0.99)):
        if implicit > 0:
            raise ZeroDivisionError("the broken rule divided by zero")
        return formulas.clip_momentum(target, bounds)


def test_a_run_that_raises_is_recorded_and_the_sweep_goes_on(monkeypatch, tiny_sweep, tmp_path):
    monkeypatch.setitem(rules.RULES, "broken", Broken)
    out = copy_cache(tiny_sweep[0], tmp_path / "sweep")
    config = TINY.with_changes(rules=("additive", "broken"), staleness_models=("geometric",))
    result = run_sweep(config, out, jobs=1)
    # Every other run has its result; the broken rule's runs at M = 8 failed, with their error.
    failed = {(f.spec.workers, f.spec.rule) for f in result.failures}
    assert failed == {(8, "broken")}
    assert all("ZeroDivisionError: the broken rule divided" in f.error for f in result.failures)
    assert {row["status"] for row in result.rows if row["method"] == "additive"} <= {
        "converged", "capped", "diverged"
    }  # fmt: skip
    cell = next(c for c in result.cells if c.workers == 8 and c.staleness == "geometric")
    assert cell.rules["broken"].failed == config.seeds
    assert cell.rules["additive"].failed == 0
    assert cell.oracle is not None
    table = (out / TABLE_NAME).read_text()
    assert "**failed**" in table
    assert "(**failed runs: 2**)" in table
    assert "### Failed runs: 2" in table
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert len(summary["failures"]) == 2
    # Failed runs are not cached: a re-run tries them again.
    again = run_sweep(config, out, jobs=1)
    assert again.computed == 2
    assert len(again.failures) == 2


def test_a_run_that_raises_in_a_worker_process_is_recorded_too(monkeypatch, tmp_path):
    # Worker processes do not see a rule registered here: their runs raise "unknown rule".
    monkeypatch.setitem(rules.RULES, "broken", Broken)
    config = TINY.with_changes(
        rules=("broken",), staleness_models=("geometric",), momenta=(0.5, 0.9)
    )
    result = run_sweep(config, tmp_path, jobs=2)
    assert result.failures
    assert all(f.spec.rule == "broken" for f in result.failures)
    assert all(f.phase == "grid" for f in result.failures)


def test_cli_a_failed_run_exits_1_at_the_end_naming_it(monkeypatch, tiny_sweep, tmp_path, capsys):
    monkeypatch.setitem(rules.RULES, "broken", Broken)
    out = copy_cache(tiny_sweep[0], tmp_path / "sweep")
    args = sweep_parser().parse_args(["sweep", *TINY_ARGS, "--out", str(out)])
    args.rules = ("additive", "broken")
    args.staleness = ("geometric",)
    assert args.handler(args) == 1
    captured = capsys.readouterr()
    assert "| geometric | 8 |" in captured.out  # the table is printed and written
    assert (out / TABLE_NAME).exists()
    assert "2 runs failed" in captured.err
    assert "grid run quadratic geometric M=8 broken" in captured.err
    assert "ZeroDivisionError" in captured.err
