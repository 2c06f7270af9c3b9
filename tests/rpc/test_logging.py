"""The request log (one INFO line per request, structured fields) and the JSON log format."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed_server.cli.logging_setup import JsonFormatter, configure_logging
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes

REQUEST_LOG = "qwen25vl_embed_server.requests"
FIELDS = ("method", "request_id", "images", "tokens", "outputs", "status", "ms")


def request_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    """The request log's records, once ``count`` have arrived (the server thread writes each
    line as its request finishes, which may be just after the client has its result)."""
    deadline = time.monotonic() + 10
    while True:
        records = [r for r in caplog.records if r.name == REQUEST_LOG]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.01)


def test_each_request_logs_one_info_line_with_its_fields(
    server: BackgroundServer, client: EmbeddingClient, caplog: pytest.LogCaptureFixture
) -> None:
    images = [png_bytes(noise_image(56, 56)), png_bytes(noise_image(84, 56, seed=1))]
    with caplog.at_level(logging.INFO, logger=REQUEST_LOG):
        client.extract(images, outputs=["lm_last_token"], request_id="req-1")
        with pytest.raises(EmbeddingError):
            client.extract(b"not an image", request_id="req-2")
        list(client.extract_many([images[0], b"GIF89a-broken"], errors="return"))
        records = request_lines(caplog, 4)

    assert len(records) == 4
    assert all(r.levelno == logging.INFO for r in records)
    by_id = {vars(r)["request_id"]: r for r in records}
    lines = {request_id: vars(r) for request_id, r in by_id.items()}  # fields are `extra` attributes
    ok, bad = lines["req-1"], lines["req-2"]
    assert {field: ok[field] for field in ("method", "images", "outputs", "status")} == {
        "method": "Extract",
        "images": 2,
        "outputs": ["lm_last_token"],
        "status": "OK",
    }
    assert ok["tokens"] > 0
    assert ok["ms"] >= ok["model_ms"] > 0
    assert ok["error"] == ""
    assert (
        by_id["req-1"]
        .getMessage()
        .startswith(f"Extract id=req-1 images=2 tokens={ok['tokens']} outputs=lm_last_token status=OK ms=")
    )
    assert bad["status"] == "INVALID_ARGUMENT"
    assert "could not be decoded" in bad["error"]
    assert bad["tokens"] == 0
    assert all(field in bad for field in FIELDS)
    # ExtractBatch: one line per request of the stream, ids as the SDK numbers them.
    assert {(lines[i]["method"], lines[i]["status"]) for i in ("0", "1")} == {
        ("ExtractBatch", "OK"),
        ("ExtractBatch", "INVALID_ARGUMENT"),
    }


def test_json_formatter_writes_one_object_with_the_extra_fields() -> None:
    logger = logging.getLogger("test.json")
    record = logger.makeRecord(
        logger.name,
        logging.INFO,
        __file__,
        1,
        "Extract id=%s status=%s",
        ("a", "OK"),
        None,
        extra={
            "request_id": "a",
            "images": 2,
            "outputs": ["lm_last_token"],
            "status": "OK",
            "ms": 1.5,
            "path": Path("."),
        },
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "Extract id=a status=OK"
    assert (entry["level"], entry["logger"]) == ("INFO", "test.json")
    assert entry["time"].endswith("+00:00")
    assert {k: entry[k] for k in ("request_id", "images", "outputs", "status", "ms")} == {
        "request_id": "a",
        "images": 2,
        "outputs": ["lm_last_token"],
        "status": "OK",
        "ms": 1.5,
    }
    assert entry["path"] == "."  # not JSON-serialisable: written as str()
    assert "args" not in entry
    assert "msg" not in entry


def test_json_formatter_includes_the_traceback() -> None:
    logger = logging.getLogger("test.json")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exception"]


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


def test_cli_log_format_json_writes_json_lines(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qwen25vl_embed_server.cli", "--log-format", "json", "make-tiny-model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    # Progress bars share stderr; every log line is a JSON object.
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(e["message"].startswith("built random-weight") for e in entries), done.stderr
    assert all(e["level"] == "INFO" for e in entries)
