"""Load test: many concurrent clients mixing good, bad, cancelled and deadline-limited requests.

Each client has its own channel and sends its requests one after the other; the clients run at
once. Kinds of request:

  good       a valid image: must get exactly its own result (the same values as that image run
             alone beforehand, and its own request id)
  bad        corrupt bytes, a truncated PNG, or an unknown output name: must get INVALID_ARGUMENT
  cancelled  a valid image, cancelled by the client 0-50 ms after sending: CANCELLED, or its own
             correct result if it finished first
  deadline   a valid image with a 1-200 ms deadline: DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (refused
             at once: the work ahead would keep it past its deadline), or its own correct result
  stream     an ExtractBatch stream (``extract_many``) of good and bad images: each item as above

Every request gets a unique id and must end with exactly one outcome: none is lost (a client
that never heard back), none duplicated, no result wrong. Afterwards the server must still be
healthy and serve a good request correctly. Bounded in time (each call has a deadline, the whole
run a limit) and in count; loopback only.

    python -m bench.service.load_test                            # 32 clients x 20 requests, own tiny server
    python -m bench.service.load_test --clients 64 --requests 50 --max-queue 32   # overload: RESOURCE_EXHAUSTED
    python -m bench.service.load_test --server 127.0.0.1:50051   # a server already running on this machine

The test suite runs the same code at a small scale (tests/rpc/test_load.py).
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import Benchmark, noise_png
from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings
from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.requests import build_request
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc

BENCH = Benchmark(__spec__.name, __doc__)
KINDS = ("good", "bad", "cancelled", "deadline", "stream")
OK = "OK"
# What each kind of request may end with (OK: its own correct result); stream items as their own kinds.
EXPECTED: dict[str, frozenset[str]] = {
    "good": frozenset({OK}),
    "bad": frozenset({"INVALID_ARGUMENT"}),
    "cancelled": frozenset({OK, "CANCELLED"}),
    "deadline": frozenset({OK, "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}),
    "stream good": frozenset({OK}),
    "stream bad": frozenset({"INVALID_ARGUMENT"}),
}
OVERLOADED = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class LoadConfig:
    """The size and mix of a run.

    ``mix``: relative weights of the kinds (see the module docstring). ``allow_overload``: count
    RESOURCE_EXHAUSTED (a full server queue) as an expected outcome of any request.
    """

    clients: int = 32
    requests_per_client: int = 20
    mix: dict[str, float] = field(
        default_factory=lambda: {"good": 0.5, "bad": 0.15, "cancelled": 0.15, "deadline": 0.15, "stream": 0.05}
    )
    stream_length: int = 4
    distinct_images: int = 8
    outputs: tuple[str, ...] = ("projected_pooled_mean", "lm_image_pooled_mean", "lm_last_token")
    seed: int = 0
    call_timeout: float = 60.0
    max_seconds: float = 600.0
    allow_overload: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(KINDS)
        if unknown or not any(weight > 0 for weight in self.mix.values()):
            raise ValueError(f"mix weights must be for {', '.join(KINDS)}, some positive; got {self.mix}")
        if self.clients < 1 or self.requests_per_client < 1 or self.distinct_images < 2 or self.stream_length < 1:
            raise ValueError("clients, requests_per_client and stream_length must be >= 1, distinct_images >= 2")


@dataclass
class LoadReport:
    """What happened. ``outcomes`` counts (kind, outcome) pairs; an outcome is OK or a status code name.

    ``requests``: planned requests (each stream item counts); ``lost``: those without an outcome;
    ``duplicated``: outcomes recorded twice for one request; ``wrong``: results that were not their
    request's own; ``unexpected``: outcomes the kind should not end with. ``latencies``: seconds,
    of the good requests (stream items excluded) that succeeded.
    """

    clients: int
    requests: int
    outcomes: Counter[tuple[str, str]]
    lost: int
    duplicated: int
    wrong: list[str]
    unexpected: list[str]
    latencies: list[float]
    duration: float
    healthy: bool

    @property
    def passed(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong or self.unexpected) and self.healthy

    def count(self, kind: str | None = None, outcome: str | None = None) -> int:
        return sum(
            n
            for (k, o), n in self.outcomes.items()
            if (kind is None or k == kind) and (outcome is None or o == outcome)
        )

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")

    def rows(self) -> list[dict[str, Any]]:
        """A row per kind: its requests and how many ended with each outcome."""
        rows = []
        for kind in EXPECTED:
            counts = {o: n for (k, o), n in sorted(self.outcomes.items()) if k == kind}
            if counts:
                outcomes = ", ".join(f"{o} {n}" for o, n in counts.items())
                rows.append({"kind": kind, "requests": sum(counts.values()), "outcomes": outcomes})
        return rows

    def figures(self) -> dict[str, Any]:
        """The run's totals: the requests and their rate, what went wrong, the good latency."""
        return {
            "clients": self.clients,
            "requests": self.requests,
            "requests/s": self.requests / self.duration,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "wrong": len(self.wrong),
            "unexpected": len(self.unexpected),
            "server healthy after": self.healthy,
            "good latency p50 ms": self.percentile_ms(50),
            "good latency p99 ms": self.percentile_ms(99),
        }

    def summary(self) -> str:
        lines = [
            f"clients {self.clients}, requests {self.requests}, duration {self.duration:.1f} s "
            f"({self.requests / self.duration:.0f} requests/s)",
        ]
        lines.extend(f"  {row['kind']:<11} {row['requests']:>6}: {row['outcomes']}" for row in self.rows())
        lines.append(
            f"lost {self.lost}, duplicated {self.duplicated}, wrong {len(self.wrong)}, "
            f"unexpected {len(self.unexpected)}, server healthy after: {'yes' if self.healthy else 'NO'}"
        )
        lines.append(
            f"good latency p50 {self.percentile_ms(50):.1f} ms, p99 {self.percentile_ms(99):.1f} ms "
            f"({len(self.latencies)} requests)"
        )
        lines.extend(f"  wrong: {line}" for line in self.wrong[:10])
        lines.extend(f"  unexpected: {line}" for line in self.unexpected[:10])
        return "\n".join(lines)


def bad_inputs(good: bytes) -> list[tuple[bytes, tuple[str, ...] | None]]:
    """(image bytes, outputs or None for the defaults) that the server must refuse."""
    return [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, None),  # a PNG signature, then garbage
        (good[: len(good) // 2], None),  # truncated
        (good, ("no_such_output",)),
    ]


class _Run:
    """The shared state of one run: references, outcomes by request id."""

    def __init__(self, address: str, config: LoadConfig) -> None:
        self.address = address
        self.config = config
        rng = random.Random(config.seed)
        sizes = [(56 + 28 * rng.randrange(5), 56 + 28 * rng.randrange(5)) for _ in range(config.distinct_images)]
        self.images = [noise_png(w, h, seed) for seed, (w, h) in enumerate(sizes)]
        self.references: list[Embeddings] = []
        self.lock = threading.Lock()
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.duplicated = 0
        self.wrong: list[str] = []
        self.latencies: list[float] = []

    def compute_references(self) -> None:
        """Every image alone, one request at a time; they must differ from each other."""
        with EmbeddingClient(self.address, timeout=self.config.call_timeout) as sdk:
            self.references = [sdk.extract(image, outputs=self.config.outputs) for image in self.images]
        for i, first in enumerate(self.references):
            for j in range(i):
                if self._same(first, self.references[j]):
                    raise RuntimeError(f"images {j} and {i} give the same result: a mix-up would not show")

    def _same(self, result: Embeddings, reference: Embeddings) -> bool:
        return all(
            result[name].shape == reference[name].shape
            and np.allclose(result[name], reference[name], rtol=1e-4, atol=1e-5)
            for name in self.config.outputs
        )

    def record(self, request_id: str, kind: str, outcome: str) -> None:
        with self.lock:
            if request_id in self.outcomes:
                self.duplicated += 1
            self.outcomes[request_id] = (kind, outcome)

    def check(self, request_id: str, image: int, result: Embeddings, expected_id: str | None = None) -> str:
        """OK if ``result`` is exactly the result of image ``image`` for request ``request_id``."""
        if expected_id is not None and result.request_id != expected_id:
            with self.lock:
                self.wrong.append(f"{request_id}: got the result of request {result.request_id!r}")
            return "WRONG"
        if not self._same(result, self.references[image]):
            with self.lock:
                self.wrong.append(f"{request_id}: values differ from image {image} alone")
            return "WRONG"
        return OK


def _plan(config: LoadConfig, client: int) -> list[str]:
    rng = random.Random(config.seed * 1_000_003 + client)
    kinds = [kind for kind in KINDS if config.mix.get(kind, 0) > 0]
    weights = [config.mix[kind] for kind in kinds]
    return rng.choices(kinds, weights, k=config.requests_per_client)


def _client(run: _Run, index: int, stop_at: float) -> None:
    config = run.config
    rng = random.Random(config.seed * 7919 + index)
    with (
        EmbeddingClient(run.address, timeout=config.call_timeout) as sdk,
        grpc.insecure_channel(run.address) as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for seq, kind in enumerate(_plan(config, index)):
            if time.monotonic() > stop_at:
                return  # what is left counts as lost
            request_id = f"c{index}-r{seq}"
            image = rng.randrange(len(run.images))
            if kind == "good":
                started = time.monotonic()
                outcome = _call(sdk.extract, run.images[image], outputs=config.outputs, request_id=request_id)
                if isinstance(outcome, Embeddings):
                    latency = time.monotonic() - started
                    outcome = run.check(request_id, image, outcome, expected_id=request_id)
                    if outcome == OK:
                        with run.lock:
                            run.latencies.append(latency)
                run.record(request_id, kind, outcome)
            elif kind == "bad":
                data, outputs = rng.choice(bad_inputs(run.images[image]))
                outcome = _call(sdk.extract, data, outputs=outputs or config.outputs, request_id=request_id)
                run.record(request_id, kind, outcome if isinstance(outcome, str) else "OK (a bad request succeeded)")
            elif kind == "cancelled":
                request = build_request(run.images[image], outputs=config.outputs, request_id=request_id)
                call = stub.Extract(request, timeout=config.call_timeout)
                time.sleep(rng.uniform(0, 0.05))
                call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves cancel() unannotated
                outcome = _call(_collect, call)
                if isinstance(outcome, Embeddings):
                    outcome = run.check(request_id, image, outcome, expected_id=request_id)
                run.record(request_id, kind, outcome)
            elif kind == "deadline":
                timeout = rng.choice([0.001, 0.01, 0.05, 0.2])
                outcome = _call(
                    sdk.extract, run.images[image], outputs=config.outputs, request_id=request_id, timeout=timeout
                )
                if isinstance(outcome, Embeddings):
                    outcome = run.check(request_id, image, outcome, expected_id=request_id)
                run.record(request_id, kind, outcome)
            else:
                _stream(run, sdk, request_id, rng)


def _stream(run: _Run, sdk: EmbeddingClient, request_id: str, rng: random.Random) -> None:
    """One ExtractBatch stream of good and bad items; each item must get its own outcome, in order."""
    config = run.config
    items: list[tuple[int, bytes, bool]] = []
    for _ in range(config.stream_length):
        image = rng.randrange(len(run.images))
        if rng.random() < 0.25:
            items.append((image, bad_inputs(run.images[image])[rng.randrange(2)][0], False))
        else:
            items.append((image, run.images[image], True))
    received = 0
    try:
        results = sdk.extract_many([data for _, data, _ in items], outputs=config.outputs, errors="return")
        for position, result in enumerate(results):
            received += 1
            item_id = f"{request_id}-{position}"
            if position >= len(items):
                with run.lock:
                    run.duplicated += 1
                continue
            image, _, good = items[position]
            kind = "stream good" if good else "stream bad"
            if isinstance(result, EmbeddingError):
                run.record(item_id, kind, result.code.name)
            else:
                outcome = run.check(item_id, image, result)
                run.record(item_id, kind, outcome if good else "OK (a bad request succeeded)")
    except EmbeddingError as error:  # the whole stream failed: the items not yet answered get its code
        for position in range(received, len(items)):
            kind = "stream good" if items[position][2] else "stream bad"
            run.record(f"{request_id}-{position}", kind, error.code.name)


def _call(function: Callable[..., Embeddings], *args: Any, **kwargs: Any) -> Embeddings | str:
    """``function(*args, **kwargs)``, or the name of the status code it failed with."""
    try:
        return function(*args, **kwargs)
    except EmbeddingError as error:
        return error.code.name
    except grpc.RpcError as error:
        code = error.code() if callable(getattr(error, "code", None)) else None
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _collect(call: Iterable[pb.EmbeddingResponse]) -> Embeddings:
    builder = ResultBuilder()
    for response in call:
        builder.add(response)
    return builder.build()


def _planned(config: LoadConfig) -> list[str]:
    ids: list[str] = []
    for index in range(config.clients):
        for seq, kind in enumerate(_plan(config, index)):
            request_id = f"c{index}-r{seq}"
            if kind == "stream":
                ids.extend(f"{request_id}-{position}" for position in range(config.stream_length))
            else:
                ids.append(request_id)
    return ids


def check_health(address: str, reference: Embeddings, image: bytes, outputs: Sequence[str], timeout: float) -> bool:
    """SERVING, and a good request gets its correct result."""
    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    if status.status != health_pb2.HealthCheckResponse.SERVING:
        return False
    with EmbeddingClient(address, timeout=timeout) as sdk:
        result = sdk.extract(image, outputs=outputs)
    return all(np.allclose(result[name], reference[name], rtol=1e-4, atol=1e-5) for name in outputs)


def run_load(address: str, config: LoadConfig = LoadConfig()) -> LoadReport:
    """Run the load against a plaintext server at ``address`` (loopback) and report what happened."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host not in ("localhost", "127.0.0.1", "::1") and not host.startswith("127."):
        raise ValueError(f"the load test runs on loopback only, not {address}")
    run = _Run(address, config)
    run.compute_references()
    started = time.monotonic()
    stop_at = started + config.max_seconds
    threads = [
        threading.Thread(target=_client, args=(run, index, stop_at), name=f"load-client-{index}", daemon=True)
        for index in range(config.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, stop_at - time.monotonic()) + config.call_timeout)
    duration = time.monotonic() - started
    planned = _planned(config)
    with run.lock:
        outcomes = dict(run.outcomes)
    unexpected = []
    for request_id, (kind, outcome) in sorted(outcomes.items()):
        if outcome in EXPECTED[kind] or outcome == "WRONG":
            continue
        if outcome == OVERLOADED and config.allow_overload:
            continue
        unexpected.append(f"{request_id} ({kind}): {outcome}")
    healthy = check_health(address, run.references[0], run.images[0], config.outputs, config.call_timeout)
    return LoadReport(
        clients=config.clients,
        requests=len(planned),
        outcomes=Counter(outcomes.values()),
        lost=len(set(planned) - set(outcomes)),
        duplicated=run.duplicated + len(set(outcomes) - set(planned)),
        wrong=list(run.wrong),
        unexpected=unexpected,
        latencies=list(run.latencies),
        duration=duration,
        healthy=healthy,
    )


def _parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        mix[kind.strip()] = float(weight)
    return mix


def main(argv: Sequence[str] | None = None) -> int:
    parser = BENCH.parser(argv)
    defaults = LoadConfig()
    parser.add_argument("--server", help="host:port of a running plaintext server on loopback (default: start one)")
    parser.add_argument(
        "--clients", type=int, default=defaults.clients, help=f"concurrent clients ({defaults.clients})"
    )
    parser.add_argument(
        "--requests", type=int, default=defaults.requests_per_client, help="requests per client (%(default)s)"
    )
    parser.add_argument(
        "--mix",
        type=_parse_mix,
        default=defaults.mix,
        help="kind=weight,... of " + ", ".join(KINDS) + " (default: " + _format_mix(defaults.mix) + ")",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds, help="time limit of the run")
    parser.add_argument("--model", default="tiny-random", help="model of the server started here (tiny-random)")
    parser.add_argument("--device", default="cpu", help="device of the server started here (cpu)")
    parser.add_argument(
        "--max-queue", type=int, default=None, help="queue bound of the server started here; RESOURCE_EXHAUSTED allowed"
    )
    args = parser.parse_args(argv)
    config = LoadConfig(
        clients=args.clients,
        requests_per_client=args.requests,
        mix=args.mix,
        seed=args.seed,
        max_seconds=args.max_seconds,
        allow_overload=args.max_queue is not None,
    )
    if args.server:
        report = run_load(args.server, config)
    else:
        from qwen25vl_embed_server.rpc.harness import ServerProcess

        serve_args = ["--model", args.model, "--device", args.device]
        if args.max_queue is not None:
            serve_args += ["--max-queue", str(args.max_queue)]
        log = Path(tempfile.mkdtemp(prefix="qwen25vl-embed-load-")) / "server.log"
        print(f"qwen25vl-embed serve {' '.join(serve_args)} (log: {log})", file=sys.stderr)
        with log.open("w") as echo, ServerProcess(serve_args, echo=echo) as server:
            report = run_load(server.address, config)
            code = server.stop()
        print(f"server exit code {code}", file=sys.stderr)
    print(report.summary())
    BENCH.write(args, report.rows(), summary=report.figures(), details={"mix": config.mix, "seed": config.seed})
    return 0 if report.passed else 1


def _format_mix(mix: dict[str, float]) -> str:
    return ",".join(f"{kind}={weight:g}" for kind, weight in mix.items())


if __name__ == "__main__":
    sys.exit(main())
