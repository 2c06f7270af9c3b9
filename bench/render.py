"""Markdown performance tables rendered from the results in ``bench/results/``.

    python -m bench.render                          # every result's table, to stdout
    python -m bench.render --write docs/PAGE.md     # refresh the tables between markers in a file
    python -m bench.render --check docs/PAGE.md     # exit 1 where a file's tables differ from the results

One table per result file (``<area>-<name>-<machine>.json``, written by ``bench/common.py``): its
rows, then its summary figures, the machine, the versions, the commit and the date, and the command
that measured it. In a markdown file a table stands between two markers named after the result
file (its name without ``.json``)::

    <!-- bench:cpu-exactness-intel-xeon-processor -->
    ...
    <!-- /bench:cpu-exactness-intel-xeon-processor -->

``--write`` replaces what stands between each pair with the table; ``--check`` only compares.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MARKED = re.compile(r"(<!-- bench:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL)


def cell(value: Any) -> str:
    """One value as a table cell: yes / no, three significant digits (whole numbers from 100 on,
    powers of ten below 0.01), lists joined, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return "0" if value == 0 else str(value)
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) < 0.01:
            return f"{value:.1e}"
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ", ".join(cell(item) for item in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of the rows, in the order first seen, but those whose values are tables of their own."""
    found: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if not isinstance(value, Mapping):
                found.setdefault(key)
    return list(found)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table, numbers right-aligned."""
    names = columns(rows)
    numeric = [all(_number(row.get(name)) or row.get(name) is None for row in rows) for name in names]
    lines = [
        "| " + " | ".join(cell(name) for name in names) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(name)) for name in names) + " |" for row in rows]
    return "\n".join(lines)


def machine(result: Mapping[str, Any]) -> str:
    found = result["machine"]
    flags = [flag for flag, present in found.get("flags", {}).items() if present]
    text = f"{found['model']}, {found['cpus']} CPUs" + (f" ({', '.join(flags)})" if flags else "")
    return f"{found['gpu']}; CPU {text}" if found.get("gpu") else text


def block(result: Mapping[str, Any]) -> str:
    """One result's table, its summary figures, and what it was measured on and with."""
    parts = [table(result["rows"]), ""]
    parts += [f"- {name}: {cell(value)}" for name, value in result.get("summary", {}).items()]
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    parts += [
        f"- machine: {machine(result)}",
        f"- versions: {versions}",
        f"- commit {result['commit']}, {result['date']}",
        f"- command: `{result['command']}`",
    ]
    return "\n".join(parts)


def load(folder: Path) -> dict[str, dict[str, Any]]:
    """Every result in ``folder``, by its file name without ``.json``, in name order."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def everything(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Every table under a heading, between its markers: to paste into a page."""
    sections = [
        f"### {result['title']}\n\n<!-- bench:{name} -->\n{block(result)}\n<!-- /bench:{name} -->"
        for name, result in results.items()
    ]
    return "\n\n".join(sections) + "\n"


def fill(text: str, results: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[str]]:
    """``text`` with every marked table rendered afresh, and the markers' names that have no result."""
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in results:
            missing.append(name)
            return match[0]
        return f"{match[1]}{block(results[name])}\n{match[4]}"

    return MARKED.sub(replace, text), missing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default: bench/results)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, nargs="+", metavar="FILE", help="refresh the tables in these files")
    action.add_argument("--check", type=Path, nargs="+", metavar="FILE", help="exit 1 where these files' tables differ")
    args = parser.parse_args(argv)
    results = load(args.results)
    if not (args.write or args.check):
        sys.stdout.write(everything(results))
        return 0
    failed = False
    for path in args.write or args.check:
        text = path.read_text()
        rendered, missing = fill(text, results)
        for name in missing:
            print(f"{path}: no result {name}.json in {args.results} for its table", file=sys.stderr)
        failed = failed or bool(missing)
        if args.write:
            if rendered != text:
                path.write_text(rendered)
                print(f"{path}: tables refreshed", file=sys.stderr)
        elif rendered != text:
            pairs = zip(MARKED.finditer(text), MARKED.finditer(rendered), strict=True)
            stale = [old["name"] for old, new in pairs if old[0] != new[0]]
            print(f"{path}: tables differ from the results: {', '.join(stale)}", file=sys.stderr)
            print(f"  refresh them: python -m bench.render --write {path}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
