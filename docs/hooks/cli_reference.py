"""The command line's flag tables in the docs, generated from its argparse definitions.

A page marks where a command's tables go::

    <!-- cli-flags: serve -->
    ...generated...
    <!-- /cli-flags -->

(``qwen25vl-embed`` itself names the options before the command). ``python docs/hooks/cli_reference.py``
rewrites every marked block in ``docs/*.md`` from ``qwen25vl_embed_server.cli.app.build_parser()``.
As a MkDocs hook (``mkdocs.yml``) it fails the build when a page's tables differ from the parser's,
and ``tests/contract/test_docs.py`` checks the same: the flags are never typed by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"(<!-- cli-flags: (?P<command>[\w-]*) -->\n)(?P<body>.*?)(<!-- /cli-flags -->)", re.DOTALL)
REGENERATE = "python docs/hooks/cli_reference.py"
# argparse's own groups (their title changed in Python 3.10): one table, positionals first.
_UNNAMED_GROUPS = ("positional arguments", "options", "optional arguments")


def _parser(command: str) -> argparse.ArgumentParser:
    from qwen25vl_embed_server.cli.app import build_parser

    parser: argparse.ArgumentParser = build_parser()
    if command == parser.prog:
        return parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subparser: argparse.ArgumentParser = action.choices[command]
            return subparser
    raise KeyError(command)


def _cell(text: str) -> str:
    """Text for one table cell: pipes escaped, angle brackets as entities (never raw HTML)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default(action: argparse.Action) -> str:
    value: Any = action.default
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if value is None or value is argparse.SUPPRESS:
        return ""
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, (list, tuple)):
        return " ".join(f"`{item}`" for item in value)
    return f"`{value}`"


def _names(action: argparse.Action) -> str:
    if action.option_strings:
        names = " / ".join(f"`{name}`" for name in action.option_strings)
        return names if action.metavar is None or action.nargs == 0 else f"{names} `{action.metavar}`"
    return f"`{action.metavar or action.dest}`"


def _meaning(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        choices = ", ".join(f"`{choice}`" for choice in action.choices)
        text = f"{text} (one of {choices})" if text else f"one of {choices}"
    if action.nargs in ("+", "*"):
        text += " (one or more)"
    return _cell(text)


def flag_tables(command: str) -> str:
    """Markdown for ``command``: a table (flag, default, meaning) of its arguments and options, then one
    per named argument group, in the parser's order."""
    tables: dict[str, list[argparse.Action]] = {"": []}
    for group in _parser(command)._action_groups:
        title = group.title or ""
        if title in _UNNAMED_GROUPS:
            title = ""
        tables.setdefault(title, []).extend(
            action
            for action in group._group_actions
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        )
    parts: list[str] = []
    for title, actions in tables.items():
        if not actions:
            continue
        rows = [f"*{_cell(title[0].upper() + title[1:])}*\n"] if title else []
        rows += ["| flag | default | meaning |", "|---|---|---|"]
        rows += [f"| {_names(a)} | {_default(a)} | {_meaning(a)} |" for a in actions]
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def refresh(markdown: str) -> str:
    """``markdown`` with every marked block replaced by the parser's tables."""
    return MARKED.sub(lambda m: f"{m.group(1)}\n{flag_tables(m.group('command'))}\n{m.group(4)}", markdown)


def stale_blocks(markdown: str) -> list[str]:
    """The commands whose marked block differs from the parser's tables."""
    return [
        match.group("command")
        for match in MARKED.finditer(markdown)
        if match.group("body") != f"\n{flag_tables(match.group('command'))}\n"
    ]


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: a page whose flag tables are stale fails the build."""
    try:
        stale = stale_blocks(markdown)
    except KeyError as err:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{page.file.src_path}: the CLI has no command {err}") from err
    if stale:
        from mkdocs.exceptions import PluginError

        names = ", ".join(repr(name) for name in stale)
        raise PluginError(f"{page.file.src_path}: the flag tables of {names} differ from the CLI; run {REGENERATE}")
    return markdown


def main() -> int:
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        updated = refresh(text)
        if updated != text:
            path.write_text(updated)
            print(f"updated {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
