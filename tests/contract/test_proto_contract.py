"""The public contract: `buf lint` clean, and no breaking change since the last released snapshot.

buf is the npm-pinned CLI in tools/buf (`npm ci` runs here when its node_modules is stale; needs
Node.js and npm, which CI installs). Released contracts are buf images in tools/buf/released/,
one per release (`make contract-snapshot VERSION=x.y.z`); the newest is the one checked against.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ..npm import npm_ci

ROOT = Path(__file__).resolve().parents[2]
BUF_TOOLS = ROOT / "tools" / "buf"
PROTO = Path("protos/qwen25vl_embed/v1/embed.proto")


@pytest.fixture(scope="session")
def buf() -> Path:
    npm_ci(BUF_TOOLS)
    return BUF_TOOLS / "node_modules" / ".bin" / "buf"


def run_buf(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def last_release() -> Path:
    snapshots = sorted(
        (BUF_TOOLS / "released").glob("v*.json"),
        key=lambda path: tuple(int(part) for part in path.stem.removeprefix("v").split(".")),
    )
    assert snapshots, "no released contract snapshot in tools/buf/released/"
    return snapshots[-1]


def test_contract_passes_buf_lint(buf: Path) -> None:
    done = run_buf(buf, "lint")
    assert done.returncode == 0, f"buf lint:\n{done.stdout}{done.stderr}"


def test_contract_has_no_breaking_change_since_last_release(buf: Path) -> None:
    done = run_buf(buf, "breaking", "--against", str(last_release()))
    assert done.returncode == 0, f"breaking changes since {last_release().name}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize(
    ("old", "new", "rules"),
    [
        pytest.param("int64 offset = 5;", "int64 offset = 6;", {"FIELD_NO_DELETE"}, id="field-renumbered"),
        pytest.param("repeated int64 shape = 2;", "repeated int32 shape = 2;", {"FIELD_SAME_TYPE"}, id="type-changed"),
        pytest.param("rpc Info(InfoRequest) returns (InfoResponse);", "", {"RPC_NO_DELETE"}, id="rpc-deleted"),
        # Wire-compatible, but every generated client and the JSON form would break: FILE catches it.
        pytest.param(
            "string mime_type = 2;",
            "string media_type = 2;",
            {"FIELD_SAME_NAME", "FIELD_SAME_JSON_NAME"},
            id="field-renamed",
        ),
    ],
)
def test_breaking_check_catches_incompatible_changes(
    buf: Path, tmp_path: Path, old: str, new: str, rules: set[str]
) -> None:
    """The check is real: a copy of the workspace with one incompatible edit fails for that edit only."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / PROTO
    text = proto.read_text()
    assert text.count(old) == 1, f"{old!r} should occur once in {PROTO}; update this test's edits"
    proto.write_text(text.replace(old, new))

    done = run_buf(buf, "breaking", "--against", str(last_release()), "--error-format", "json", cwd=tmp_path)
    assert done.returncode != 0, "buf breaking accepted an incompatible change"
    found = {json.loads(line)["type"] for line in done.stdout.splitlines() if line.strip()}
    assert found == rules, done.stdout + done.stderr
