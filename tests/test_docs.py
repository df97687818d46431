"""Docs are tested: every CLI command has --help text and appears in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from embedstore.cli.app import app
from typer.testing import CliRunner

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands() -> list[tuple[str, ...]]:
    root = typer.main.get_command(app)
    out: list[tuple[str, ...]] = []

    def walk(cmd, path: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, (*path, name))
        else:
            out.append(path)

    walk(root, ())
    return out


COMMANDS = _commands()


def test_the_cli_has_the_verbs_the_brief_names() -> None:
    names = {c[0] for c in COMMANDS}
    assert {"synth", "extract", "query", "info", "train", "eval", "demo", "index",
            "neighbors", "verify", "gc"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p))
def test_every_command_has_help_and_is_in_the_readme(path: tuple[str, ...]) -> None:
    r = CliRunner().invoke(app, [*path, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output and len(r.output.split()) > 15
    assert f"embedstore {' '.join(path)}" in README, f"`embedstore {' '.join(path)}` not in README"
