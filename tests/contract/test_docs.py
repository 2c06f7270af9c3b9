"""The docs site stays true to the product: its flag tables are the CLI's own (generated from
``build_parser()`` by ``docs/hooks/cli_reference.py``), its measured tables are the stored
results' (rendered by ``python -m bench.render``), the tables written by hand name real flags with
their real defaults, the README's links reach files that exist, and
``mkdocs build --strict`` passes (broken links and anchors, pages left out of the nav).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _cli_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI_REFERENCE = _cli_reference()


@pytest.mark.parametrize("page", ["server.md", "cli.md"])
def test_flag_tables_are_the_ones_generated_from_the_cli(page: str) -> None:
    text = (DOCS / page).read_text()
    assert CLI_REFERENCE.MARKED.search(text), f"{page} has no generated flag table"
    stale = CLI_REFERENCE.stale_blocks(text)
    assert not stale, f"docs/{page}: the flag tables of {stale} differ from the CLI; run {CLI_REFERENCE.REGENERATE}"


def test_every_command_has_its_flag_table() -> None:
    marked = {
        match.group("command")
        for page in DOCS.glob("*.md")
        for match in CLI_REFERENCE.MARKED.finditer(page.read_text())
    }
    parser = CLI_REFERENCE._parser("qwen25vl-embed")
    commands = next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert marked == {"qwen25vl-embed", *commands}


def test_the_serve_table_lists_every_serve_flag() -> None:
    table = CLI_REFERENCE.flag_tables("serve")
    parser = CLI_REFERENCE._parser("serve")
    flags = {option for action in parser._actions for option in action.option_strings if option != "-h"}
    missing = {flag for flag in flags if f"`{flag}`" not in table} - {"--help"}
    assert not missing


_UNITS = {"": 1, "s": 1, "images": 1, "tokens": 1, "MiB": 1 << 20, "GiB": 1 << 30}
_DEFAULT = re.compile(r"([\d,]+)\s*(MiB|GiB|s|images|tokens)?")


def _parse_default(text: str) -> object:
    """A default as the docs' hand-written tables write it (``64 MiB``, ``131,072``, ``10 s``,
    ``never``), or ``...`` where it is prose (``32768 else``) that this check leaves alone."""
    if text == "never":
        return None
    match = _DEFAULT.fullmatch(text)
    if match is None:
        return ...
    return int(match.group(1).replace(",", "")) * _UNITS[match.group(2) or ""]


def _hand_written_flag_rows() -> list[tuple[str, str, str]]:
    """(page, flag, default as written) of every hand-written table row that names serve flags."""
    rows = []
    for page in ("server.md", "security.md"):
        text = CLI_REFERENCE.MARKED.sub("", (DOCS / page).read_text())
        header: list[str] = []
        for line in text.splitlines():
            if not line.startswith("|"):
                header = []
                continue
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if not header:
                header = cells
                continue
            if set(line) <= set("|-: ") or "flag" not in header or "default" not in header:
                continue
            flags = re.findall(r"`(--[\w-]+)`", cells[header.index("flag")])
            defaults = cells[header.index("default")].split(" / ")
            if len(defaults) != len(flags):  # one default for several flags: prose, names checked only
                defaults = ["?"] * len(flags)
            rows += [(page, flag, default) for flag, default in zip(flags, defaults, strict=True)]
    return rows


def test_hand_written_tables_name_real_flags_with_their_defaults() -> None:
    """The limit and connection tables of the docs are written for reading (``64 MiB``); each
    flag they name is a ``serve`` flag, and each default they state is the parser's."""
    parser = CLI_REFERENCE._parser("serve")
    actions = {option: action for action in parser._actions for option in action.option_strings}
    rows = _hand_written_flag_rows()
    assert len(rows) >= 20
    wrong = []
    for page, flag, written in rows:
        if flag not in actions:
            wrong.append(f"docs/{page}: {flag} is not a serve flag")
            continue
        expected = _parse_default(written) if written != "?" else ...
        if expected is not ... and expected != actions[flag].default:
            wrong.append(f"docs/{page}: {flag} default {written!r}, the parser's is {actions[flag].default!r}")
    assert not wrong


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_links_reach_files() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = {target for target in _LINK.findall(readme) if "://" not in target}
    assert targets, "the README links to the docs pages"
    assert not sorted(target for target in targets if not (ROOT / target).exists())


def test_measured_tables_are_the_ones_rendered_from_the_results() -> None:
    """Tables between ``<!-- bench:NAME -->`` markers come from ``bench/results/NAME.json``."""
    pages = [page for page in sorted(DOCS.glob("*.md")) if "<!-- bench:" in page.read_text()]
    assert pages, "the docs show the stored results"
    for page in pages:
        done = subprocess.run(
            [sys.executable, "-m", "bench.render", "--check", str(page)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{page.relative_to(ROOT)}: {done.stdout}{done.stderr}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the dev extra brings MkDocs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
