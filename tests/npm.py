"""`npm ci` for the Node.js folders the tests use (examples/node, tools/buf), once per lockfile."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def npm_ci(folder: Path) -> None:
    """Runs `npm ci` in ``folder`` unless its node_modules was installed from the same lockfile."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` not found on PATH: these tests need Node.js 20+ and npm (CI installs them)")
    digest = hashlib.sha256((folder / "package.json").read_bytes() + (folder / "package-lock.json").read_bytes())
    stamp = folder / "node_modules" / ".npm-ci.sha256"
    # Concurrent pytest runs share the folder; npm ci deletes node_modules before installing.
    lock_path = Path(tempfile.gettempdir()) / f"npm-ci-{hashlib.sha256(bytes(folder)).hexdigest()[:16]}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == digest.hexdigest():
            return
        # --ignore-scripts: no pinned package needs its install script (buf's only swaps its JS
        # launcher for the binary).
        done = subprocess.run(
            ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci in {folder} failed:\n{done.stdout}\n{done.stderr}")
        stamp.write_text(digest.hexdigest())
