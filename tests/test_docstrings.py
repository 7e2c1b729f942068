"""Docstrings and help texts that list choices list every registered one.

Rule names come from :func:`asyncmomentum.core.tuning.rules.rule_names`, update paths from the
``*_update`` functions of :mod:`asyncmomentum.core.update` and the benchmark's ``PATHS``. A rule
or path added to the registry must appear wherever the choices are spelled out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.applications.benchmarks import step_overhead
from asyncmomentum.applications.cli import build_parser
from asyncmomentum.core import update
from asyncmomentum.core.tuning.rules import rule_names

ROOT = Path(__file__).resolve().parent.parent
RULES = rule_names()
UPDATE_PATHS = tuple(name for name in update.__all__ if name.endswith("_update"))


def _missing(text: str, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not re.search(rf"\b{re.escape(name)}\b", text)]


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return capsys.readouterr().out


def test_optimizer_rule_argument_lists_every_rule() -> None:
    doc = AsyncMomentumSGD.__doc__ or ""
    rule_doc = doc[doc.index("rule:") : doc.index("momentum_bounds:")]
    assert not _missing(rule_doc, RULES), (
        f"AsyncMomentumSGD 'rule' docs lack {_missing(rule_doc, RULES)}"
    )


def test_cli_sweep_help_lists_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["sweep"], capsys)
    assert not _missing(text, RULES), f"asyncmomentum sweep --help lacks {_missing(text, RULES)}"


def test_step_overhead_help_lists_every_rule_and_path(capsys: pytest.CaptureFixture[str]) -> None:
    parser = step_overhead.build_parser()
    text = parser.format_help()
    assert not _missing(text, RULES)
    assert not _missing(text, tuple(step_overhead.PATHS))


def test_step_overhead_measure_docs_list_every_path() -> None:
    doc = step_overhead.measure.__doc__ or ""
    assert not _missing(doc, tuple(step_overhead.PATHS))


def test_update_module_docs_name_every_path() -> None:
    assert not _missing(update.__doc__ or "", UPDATE_PATHS)


def test_callback_docs_list_or_point_to_the_rules() -> None:
    pytest.importorskip("pytorch_lightning")
    from lightning_callbacks.momentum import AsyncMomentumCallback

    doc = AsyncMomentumCallback.__doc__ or ""
    assert "rule_names" in doc or not _missing(doc, RULES), (
        f"AsyncMomentumCallback docs neither point to rule_names() nor list {_missing(doc, RULES)}"
    )


def _docstrings() -> list[tuple[str, str]]:
    """(where, text) of every module, class and function docstring of both packages."""
    found = []
    for package in ("asyncmomentum", "lightning_callbacks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            nodes = [tree, *ast.walk(tree)]
            for node in nodes:
                if isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                ):
                    doc = ast.get_docstring(node)
                    if doc:
                        name = getattr(node, "name", "<module>")
                        found.append((f"{path.relative_to(ROOT)}:{name}", doc))
    return found


def test_docstrings_that_list_rules_list_them_all() -> None:
    """A docstring that names every rule but one is a list of them that misses one.

    Unless it points to ``rule_names`` for the list (and names some rules for their details).
    """
    incomplete = {}
    for where, doc in _docstrings():
        missing = _missing(doc, RULES)
        if len(missing) == 1 and len(RULES) > 2 and "rule_names" not in doc:
            incomplete[where] = missing
    assert not incomplete, f"docstrings listing rules without all of them: {incomplete}"
