"""``serve --memory-limit``: where the default comes from (cgroup v2, v1, the machine), how the
budgets derive from it, and the contract: a real ``serve`` process under a hostile mix stays
within the limit (peak RSS), answers every good request correctly or refuses it at once with
RESOURCE_EXHAUSTED, and never fails with INTERNAL or UNKNOWN."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.cli.app import build_parser
from qwen25vl_embed_server.cli.commands import server_config
from qwen25vl_embed_server.core.admission import allocator
from qwen25vl_embed_server.core.admission.memory import (
    DEFAULT_MEMORY_SHARE,
    GIB,
    KIB,
    MIB,
    PROCESSOR_BYTES_PER_TOKEN,
    MemoryBudgets,
    baseline_bytes,
    machine_memory,
    parse_size,
)
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.harness import ServerProcess

from ..helpers import assert_batched_close, noise_image, png_bytes


def test_sizes_parse_in_binary_units() -> None:
    assert parse_size("12G") == 12 * GIB
    assert parse_size("800MiB") == 800 * MIB
    assert parse_size("1.5g") == int(1.5 * GIB)
    assert parse_size("4096") == 4096
    assert parse_size("64kb") == 64 * KIB
    for bad in ("", "12X", "-1G", "G"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_size(bad)


def _fake_machine(tmp_path: Path, own: str, files: dict[str, str], total_kib: int = 24_000_000) -> tuple[Path, ...]:
    root = tmp_path / "cgroup"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {total_kib} kB\nMemFree:        1000 kB\n")
    proc_cgroup = tmp_path / "proc_cgroup"
    proc_cgroup.write_text(own)
    return root, meminfo, proc_cgroup


def test_the_memory_is_the_smallest_of_the_cgroup_limits_and_the_machines(tmp_path: Path) -> None:
    # cgroup v2: the process's own group says "max", its parent 8 GiB.
    root, meminfo, own = _fake_machine(
        tmp_path / "v2",
        "0::/app/worker\n",
        {"app/worker/memory.max": "max\n", "app/memory.max": f"{8 * GIB}\n", "memory.max": "max\n"},
    )
    assert machine_memory(root, meminfo, own) == (8 * GIB, str(root / "app" / "memory.max"))
    # cgroup v1: the memory controller's group; "no limit" is written as a huge number.
    root, meminfo, own = _fake_machine(
        tmp_path / "v1",
        "4:memory:/job\n1:cpu:/\n",
        {"memory/job/memory.limit_in_bytes": f"{6 * GIB}\n", "memory/memory.limit_in_bytes": "9223372036854771712\n"},
    )
    assert machine_memory(root, meminfo, own) == (6 * GIB, str(root / "memory" / "job" / "memory.limit_in_bytes"))
    # No cgroup limit: the machine's memory.
    root, meminfo, own = _fake_machine(tmp_path / "none", "0::/\n", {"memory.max": "max\n"}, total_kib=1_000_000)
    assert machine_memory(root, meminfo, own) == (1_000_000 * KIB, f"{meminfo} MemTotal")
    # A cgroup limit above the machine's memory: the machine's.
    root, meminfo, own = _fake_machine(tmp_path / "above", "0::/\n", {"memory.max": f"{64 * GIB}\n"}, 2_000_000)
    assert machine_memory(root, meminfo, own)[0] == 2_000_000 * KIB


def test_the_budgets_share_the_room_beside_the_model() -> None:
    """The memory bound of docs/security.md at the derived budgets is the limit: ``3 P + 9 KiB x T
    + A x min(T, N x B) + R + M`` fills the room beside the model."""
    baseline, per_token = 700 * MIB, 4 * KIB
    for limit, running in ((2 * GIB, 12_288), (2 * GIB, 0), (800 * MIB, 12_288)):
        budgets = MemoryBudgets.derive(limit, baseline, per_token, running)
        tokens = budgets.tokens
        held = (
            3 * budgets.pixels
            + PROCESSOR_BYTES_PER_TOKEN * tokens
            + per_token * min(tokens, running)
            + budgets.result_bytes
            + budgets.request_bytes
        )
        assert 0.99 * (limit - baseline) <= held <= limit - baseline, (limit, running)
    with pytest.raises(ValueError, match="leaves 20 MiB beside the model"):
        MemoryBudgets.derive(720 * MIB, baseline, per_token, 12_288)


def test_the_default_limit_fits_a_24_gb_machine_with_room_for_a_3b_model() -> None:
    """24 GB, no cgroup limit: 18 GB; Qwen2.5-VL-3B in bf16 (3.75 G parameters, 7.5 GB) beside
    4 preprocessing threads and 2 lanes leaves about 9.6 GB for the budgets, which hold several
    requests at the released checkpoints' largest resize (82,000 tokens) at once."""
    limit = int(24e9 * DEFAULT_MEMORY_SHARE)
    weights = int(3.75e9 * 2)
    baseline = baseline_bytes(weights, workers=6, resident=0)
    budgets = MemoryBudgets.derive(limit, baseline, 8 * 2048 * 2, 2 * 6144)  # 3B: hidden 2048, bf16; CPU
    assert limit - baseline > 9e9
    assert budgets.tokens * 3 // 4 > 2 * 82_000


def _serve_args(tmp_path: Path, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--model", str(tmp_path), *flags])


def test_the_flag_sets_the_limit_and_the_budget_flags_override(tmp_path: Path) -> None:
    pipeline = server_config(_serve_args(tmp_path, "--memory-limit", "3G")).service.pipeline
    assert pipeline.memory_limit == 3 * GIB
    assert pipeline.budgets(MemoryBudgets(10, 20, 30, 40)) == (20, 10, 30, 40)
    assert pipeline.trim_after_bytes == allocator.TUNED.trim_after_bytes
    override = server_config(_serve_args(tmp_path, "--memory-limit", "3G", "--max-tokens-in-flight", "5"))
    assert override.service.pipeline.budgets(MemoryBudgets(10, 20, 30, 40)) == (5, 10, 30, 40)
    default = server_config(_serve_args(tmp_path)).service.pipeline
    assert default.memory_limit == int(machine_memory()[0] * DEFAULT_MEMORY_SHARE)
    none = server_config(_serve_args(tmp_path, "--memory-limit", "none")).service.pipeline
    assert none.memory_limit is None
    assert none.trim_after_bytes is None
    assert none.budgets(None) == (262_144, 200_000_000, 1 << 30, None)
    system = server_config(_serve_args(tmp_path, "--memory-limit", "3G", "--malloc", "system")).service.pipeline
    assert system.trim_after_bytes is None


def test_a_bad_limit_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--memory-limit", "lots"])
    assert "--memory-limit" in capsys.readouterr().err


def test_a_limit_that_leaves_no_room_beside_the_model_stops_serve_with_one_line(tiny_model_path: Path) -> None:
    command = [sys.executable, "-m", "qwen25vl_embed_server.cli", "serve", "--port", "0"]
    command += ["--model", str(tiny_model_path), "--device", "cpu", "--memory-limit", "100M"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2, finished.stderr
    assert "error: the memory limit (0.10 GiB) leaves 0 MiB beside the model" in finished.stderr


# --- the contract, on a real serve process -------------------------------------------------------

LIMIT = "2G"
SERVICE = "/qwen25vl_embed.v1.EmbeddingService/"
GOOD_CALLERS, GOOD_EACH = 8, 2
OUTPUTS = ["lm_last_token"]
HEAVY = ["vision_tokens", "lm_last_hidden"]  # large results, for the streams that never read


def _solid_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _peak_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KIB
    raise AssertionError("no VmHWM")


def test_a_hostile_mix_stays_within_the_memory_limit(tiny_model_path: Path, extractor: Extractor) -> None:
    """At ``--memory-limit 2G``, at once: good callers (800 x 600 images, generous deadlines),
    decompression bombs (8000 x 8000, over the pixel limit), images at the pixel limit (7000 x
    7000: more than the limit lets one request hold), ExtractBatch streams of heavy outputs that
    never read, and calls cancelled mid-way. Peak RSS (VmHWM, the whole process) <= the limit."""
    goods = [png_bytes(noise_image(800, 600, seed)) for seed in range(GOOD_CALLERS)]
    references = [
        extractor.extract([Image.open(io.BytesIO(data)).convert("RGB")], plan=extractor.plan(OUTPUTS)).tensors[
            "lm_last_token"
        ]
        for data in goods
    ]
    bomb, oversized = _solid_png(8000, 8000), _solid_png(7000, 7000)
    arguments = ["--model", str(tiny_model_path), "--device", "cpu", "--dtype", "float32"]
    arguments += ["--memory-limit", LIMIT, "--send-timeout", "3"]
    outcomes: list[tuple[str, str]] = []
    slow_refusals: list[float] = []
    wrong: list[int] = []

    with ServerProcess(arguments, echo=None) as server:
        assert server.process is not None

        def good(index: int) -> None:
            with EmbeddingClient(server.address, timeout=120, retry=None) as client:  # the answers as sent
                for _ in range(GOOD_EACH):
                    sent = time.monotonic()
                    try:
                        result = client.extract(goods[index], outputs=OUTPUTS)
                    except EmbeddingError as error:
                        outcomes.append(("good", error.code.name))
                        if time.monotonic() - sent > 5.0:
                            slow_refusals.append(time.monotonic() - sent)
                        continue
                    outcomes.append(("good", "OK"))
                    try:
                        assert_batched_close(result["lm_last_token"], references[index])
                    except AssertionError:
                        wrong.append(index)

        def refused(kind: str, data: bytes) -> None:
            with grpc.insecure_channel(server.address) as channel:
                call = channel.unary_stream(SERVICE + "Extract", pb.ImageRequest.SerializeToString, None)
                try:
                    list(call(pb.ImageRequest(images=[pb.Image(data=data)], outputs=OUTPUTS), timeout=120))
                    outcomes.append((kind, "OK"))
                except grpc.RpcError as error:
                    outcomes.append((kind, error.code().name))

        def non_reader() -> None:
            unread = pb.ImageRequest(images=[pb.Image(data=goods[0])], outputs=HEAVY).SerializeToString()
            with grpc.insecure_channel(server.address) as channel:
                batch = channel.stream_stream(SERVICE + "ExtractBatch", None, None)
                responses = batch(iter([unread] * 6), timeout=120)
                time.sleep(6)  # read nothing: ended by --send-timeout
                responses.cancel()
                outcomes.append(("non-reader", "abandoned"))

        def cancelled(index: int) -> None:
            with grpc.insecure_channel(server.address) as channel:
                call = channel.unary_stream(SERVICE + "Extract", pb.ImageRequest.SerializeToString, None)
                responses = call(pb.ImageRequest(images=[pb.Image(data=goods[index])], outputs=HEAVY), timeout=120)
                time.sleep(0.2 + 0.1 * index)
                responses.cancel()
                try:
                    list(responses)
                    outcomes.append(("cancelled", "OK"))
                except grpc.RpcError as error:
                    outcomes.append(("cancelled", error.code().name))

        threads = [threading.Thread(target=good, args=(i,)) for i in range(GOOD_CALLERS)]
        threads += [threading.Thread(target=refused, args=("bomb", bomb)) for _ in range(3)]
        threads += [threading.Thread(target=refused, args=("oversized", oversized)) for _ in range(3)]
        threads += [threading.Thread(target=non_reader) for _ in range(2)]
        threads += [threading.Thread(target=cancelled, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak = _peak_bytes(server.process.pid)

    codes = {code for _, code in outcomes}
    assert not codes & {"INTERNAL", "UNKNOWN"}, outcomes
    assert {code for kind, code in outcomes if kind == "good"} <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert ("good", "OK") in outcomes
    assert not wrong
    assert not slow_refusals, f"refusals of good requests came after {slow_refusals} s"
    assert {code for kind, code in outcomes if kind == "bomb"} == {"INVALID_ARGUMENT"}, outcomes
    assert {code for kind, code in outcomes if kind == "oversized"} == {"RESOURCE_EXHAUSTED"}, outcomes
    assert {code for kind, code in outcomes if kind == "cancelled"} <= {"CANCELLED", "OK"}, outcomes
    assert len(outcomes) == GOOD_CALLERS * GOOD_EACH + 3 + 3 + 2 + 4
    assert peak <= parse_size(LIMIT), f"peak RSS {peak / MIB:.0f} MiB over the limit {LIMIT}"
