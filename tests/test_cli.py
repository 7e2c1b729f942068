"""The ``asyncmomentum`` command end to end, at tiny sizes."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asyncmomentum import __version__
from asyncmomentum.applications import bench, demo
from asyncmomentum.applications.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncmomentum", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_version():
    done = _cli("--version")
    assert done.returncode == 0
    assert __version__ in done.stdout


def test_demo_simulated_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "demo"
    done = _cli(
        "demo",
        "--backend",
        "simulate",
        "--workers",
        "4",
        "--steps",
        "10",
        "--out",
        str(out),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "AsyncMomentumSGD(momentum=0.9)" in done.stdout
    assert "torch.optim.SGD(momentum=0.9)" in done.stdout
    rows = list(csv.DictReader((out / "demo.csv").open()))
    assert {row["run"] for row in rows} == set(demo.RUNS)
    assert len(rows) == 2 * 40
    assert (out / "demo.png").stat().st_size > 10_000
    assert not list(out.glob(".partial-*"))


def test_demo_with_real_hogwild_processes_estimates_more_than_one_worker(tmp_path):
    config = demo.DemoConfig(workers=3, steps=25, out=tmp_path / "hogwild", progress=False)
    result = demo.run_demo(config)
    fixed, tuned = result.runs
    assert fixed.updates == tuned.updates == 75
    assert tuned.estimated_workers > 1.0
    assert tuned.algorithmic_momentum < 0.9  # it removed momentum for the asynchrony


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--workers", "0"], "workers must be an integer >= 1"),
        (["demo", "--backend", "mpi"], "invalid choice"),
        (["demo", "--steps", "many"], "invalid int value"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_out_exits_2_and_leaves_nothing(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["demo", "--backend", "simulate", "--out", str(blocker / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot write the demo's files to --out" in err
    assert "is a file, so no folder can be created under it" in err
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_out_in_a_special_folder_says_what_is_wrong(capsys):
    code = main(["demo", "--backend", "simulate", "--out", "/proc/forbidden", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "a folder cannot be created in '/proc'" in err
    assert "not an ordinary, writable folder" in err


def test_failed_write_leaves_previous_results_and_no_partial_files(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    config = demo.DemoConfig(workers=2, steps=12, backend="simulate", out=out, progress=False)
    demo.run_demo(config)
    before = (out / "demo.csv").read_bytes()

    def broken_plot(path: Path, *args) -> None:
        path.write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(demo, "_write_plot", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        demo.run_demo(config)
    assert (out / "demo.csv").read_bytes() == before
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["demo.csv", "demo.png"]


def test_formats_a_diverged_run_without_nan():
    run = demo.RunSummary(label="torch.optim.SGD(momentum=0.9)", updates=5)
    table = demo.format_table([run])
    assert "diverged" in table
    assert "nan" not in table.lower()


def test_bench_refuses_an_unknown_name(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


def test_bench_runs_each_benchmark_as_a_module_in_a_fresh_interpreter(monkeypatch, capsys):
    commands = []
    monkeypatch.setattr(bench.subprocess, "call", lambda command: commands.append(command) or 0)
    assert main(["bench", "--quick", "convergence", "step_overhead"]) == 0
    module = "asyncmomentum.applications.benchmarks"
    assert commands == [
        [sys.executable, "-m", f"{module}.convergence", "--smoke"],
        [sys.executable, "-m", f"{module}.step_overhead", "--steps", "20", "--repeats", "1"],
    ]
    out = capsys.readouterr().out
    assert f"== step_overhead: -m {module}.step_overhead --steps 20 --repeats 1" in out


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The package built as a wheel and installed into a folder of its own, away from the source.

    Returns the folder to run from (outside the source tree) and the environment that imports the
    installed package (``PYTHONPATH`` the installation; torch and the rest come from this venv).
    """
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy, so that the build leaves nothing in the work tree
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("asyncmomentum", "lightning_callbacks"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist"]
    subprocess.run(
        [*pip, *build, source],
        check=True,
        timeout=240,
    )
    (wheel,) = (tmp / "dist").glob("asyncmomentum-*.whl")
    site = tmp / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
        check=True,
        timeout=240,
    )
    run_dir = tmp / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "import asyncmomentum; print(asyncmomentum.__file__)"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(done.stdout.strip()).is_relative_to(site), done.stdout
    return run_dir, env


def test_bench_runs_from_an_installed_wheel(installed_wheel):
    run_dir, env = installed_wheel
    done = subprocess.run(
        [sys.executable, "-m", "asyncmomentum", "bench", "--quick", "step_overhead"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("path "))
    columns = ["path", "AsyncMomentumSGD", "ms", "torch.optim.SGD", "ms", "ratio", "min..max"]
    columns += ["mean", "ratio", "backward", "ms", "backward+step"]
    assert lines[header].split() == columns
    paths = [line.split()[0] for line in lines[header + 1 : header + 5]]
    assert paths == ["foreach", "fused", "single", "default"]
    assert "== step_overhead: exit 0" in done.stdout
