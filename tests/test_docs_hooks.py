"""The generated CLI reference page (tools/docs_hooks.py) lists every subcommand and option."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from facto_fx.cli import build_parser

HOOKS = Path(__file__).resolve().parents[1] / "tools" / "docs_hooks.py"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", HOOKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_marker_becomes_every_subcommands_help():
    hooks = _hooks()
    page = hooks.on_page_markdown(f"# CLI\n\n{hooks.MARKER}\n", page=None)
    assert hooks.MARKER not in page
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # an independent route to the parsers
    assert set(subcommands) == {"report", "train", "demo"}
    for name, sub in subcommands.items():
        assert f"## `facto-fx {name}`" in page
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in page, (name, flag)


def test_pages_without_the_marker_are_left_as_they_are():
    assert _hooks().on_page_markdown("# Usage\n\ntext\n", page=None) == "# Usage\n\ntext\n"
