"""MkDocs hooks: pages that are generated from the code, so they cannot drift from it.

`<!-- facto-fx help -->` in a page becomes `facto-fx --help` and every subcommand's `--help`, each
in a code block, rendered from the CLI's own parser (facto_fx.cli.build_parser).
"""

from __future__ import annotations

import argparse
import os
from unittest import mock

MARKER = "<!-- facto-fx help -->"
WIDTH = "100"  # argparse wraps to $COLUMNS: a fixed width renders the same on every machine


def cli_reference() -> str:
    """Markdown: the top-level help, then a section per subcommand with its full help."""
    from facto_fx.cli import build_parser

    with mock.patch.dict(os.environ, {"COLUMNS": WIDTH}):
        parser = build_parser()
        sections = [f"```text\n{parser.format_help()}```"]
        for action in parser._actions:  # argparse keeps its subcommands only here
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    sections.append(f"## `facto-fx {name}`\n\n```text\n{sub.format_help()}```")
    return "\n\n".join(sections)


def on_page_markdown(markdown: str, **_) -> str:
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown
