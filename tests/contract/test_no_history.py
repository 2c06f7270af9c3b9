"""The product speaks of itself, never of its making: no development history in the README, the
docs, the code, its comments and docstrings, the tests or the benchmarks' output.

Every text file git knows (tracked, or new and not ignored) is scanned, except the changelog,
where releases are history by design. A hit names ``file:line`` and the words; reword it to say
what the product does now (history lives in git and in ``CHANGELOG.md``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

HISTORY = re.compile(
    r"""
      \bstops?\ \#?\d+\b                                    # "stops 22" and the singular
    | \b(?:this|that|the\ previous|an?\ earlier|the\ next|the\ last)\ stop\b
    | \bthe\ stop\ (?:before|after)\b
    | \bsessions?\b
    | \bissues?\ \#\d+
    | \bearlier\ runs?\b
    | \bone-off\b
    | \bused\ to\b
    | \bthe\ old\b
    """,
    re.IGNORECASE | re.VERBOSE,
)
"""Words that tell the story of the work instead of the product."""

TECHNICAL = re.compile(
    r"""
      scope=["']session["']                                 # pytest's fixture scope
    | \bsession\ of\ its\ own\b | \bstart_new_session\b | \bsetsid\b   # a POSIX process session
    | \.session\b                                          # an API's own name: requests.Session
    """,
    re.IGNORECASE | re.VERBOSE,
)
"""Uses of those words that are terms of the trade, not history: removed before the scan."""

EXCLUDED = {"CHANGELOG.md", THIS}


def _files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and name not in EXCLUDED})


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):  # deleted in the working tree, or a submodule
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def history_hits(name: str, text: str) -> list[str]:
    """``file:line: words`` for each line of ``text`` that tells development history."""
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        found = HISTORY.findall(TECHNICAL.sub("", line))
        if found:
            hits.append(f"{name}:{number}: {', '.join(repr(word) for word in found)}")
    return hits


def test_no_development_history_in_the_product() -> None:
    hits = []
    for name in _files():
        text = _text(ROOT / name)
        if text is not None:
            hits += history_hits(name, text)
    assert not hits, "development history in the product (say what it does now):\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "line",
    [
        "as measured in stop" + " 28",  # split: the repository itself holds none of these phrases
        "This stop's run on Zen 4",
        "the previous" + " stop's profile",
        "an earlier stop; fp32",
        "in the stop after that",
        "one run, this" + " session",
        "the goal of issue" + " #10",
        "An earlier run of this gave",
        "a one" + "-off script",
        "the batcher used to end its loop",
        "the old strict FIFO budget",
    ],
)
def test_history_words_are_found(line: str) -> None:
    assert history_hits("x.md", line)


@pytest.mark.parametrize(
    "line",
    [
        '@pytest.fixture(scope="session")',
        "It runs in a session of its own: Ctrl-C does not reach it",
        "subprocess.Popen(argv, start_new_session=True)",
        "with requests.Session() as http:",
        "a stop signal ends the server",
        "the older weight names",
        "a previous run wrote these rows",
        "stops at the next gap",
    ],
)
def test_terms_of_the_trade_pass(line: str) -> None:
    assert not history_hits("x.py", line)
