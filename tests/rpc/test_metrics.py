"""Prometheus metrics scraped over HTTP from a real server, and per-response timings."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings, Timings
from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.cli import app as cli
from qwen25vl_embed_server.cli.commands import server_config
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metered(tiny_server: Callable[..., BackgroundServer]) -> Iterator[BackgroundServer]:
    """A server of its own (fresh counters) with the metrics endpoint on a free port."""
    with tiny_server(metrics_port=0) as running:
        yield running


def scrape(server: BackgroundServer) -> Samples:
    """Every sample of the server's /metrics page: (name, sorted labels) -> value."""
    port = server.service.metrics.http_port
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scraped_metrics_count_requests_by_status_and_stage(metered: BackgroundServer) -> None:
    before = scrape(metered)
    images = [png_bytes(noise_image(56, 56, seed=i)) for i in range(3)]
    with EmbeddingClient(metered.address) as client:
        client.extract(images[0])
        client.extract(images[:2])  # one request, two images
        with pytest.raises(EmbeddingError):
            client.extract(b"not an image")
        results = list(client.extract_many([images[2], b"", b"GIF89a-broken"], errors="return"))
    # b"" is refused by the SDK (never sent), the broken GIF by the server.
    assert [type(r).__name__ for r in results] == ["Embeddings", "LocalRequestError", "EmbeddingError"]
    after = scrape(metered)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "qwen25vl_embed_requests_total"
    assert delta(requests, method="Extract", status="OK") == 2
    assert delta(requests, method="Extract", status="INVALID_ARGUMENT") == 1
    assert delta(requests, method="ExtractBatch", status="OK") == 1
    # b"" never leaves the client; the broken GIF is refused by the server.
    assert delta(requests, method="ExtractBatch", status="INVALID_ARGUMENT") == 1
    assert delta("qwen25vl_embed_request_duration_seconds_count", method="Extract") == 3
    assert delta("qwen25vl_embed_request_duration_seconds_count", method="ExtractBatch") == 2
    for stage in ("preprocess", "queue", "serialize"):  # once per request that got that far
        assert delta(f"qwen25vl_embed_{stage}_duration_seconds_count") == 3, stage
    assert delta("qwen25vl_embed_images_total") == 4
    assert delta("qwen25vl_embed_tokens_total") > 0
    # Sequential requests: every batch held exactly one request.
    batches = delta("qwen25vl_embed_batch_size_count")
    assert batches == 3
    assert delta("qwen25vl_embed_batch_size_sum") == 3
    assert delta("qwen25vl_embed_batch_images_sum") == 4
    assert delta("qwen25vl_embed_model_duration_seconds_count") == batches
    assert delta("qwen25vl_embed_batch_size_bucket", le="1.0") == 3
    assert value(after, "qwen25vl_embed_queue_depth") == 0
    assert value(after, "qwen25vl_embed_requests_in_progress", method="Extract") == 0
    assert value(after, "qwen25vl_embed_model_load_seconds") > 0
    assert value(after, "process_cpu_seconds_total") > 0  # the process collector is registered


def test_without_a_metrics_port_no_endpoint_runs(server: BackgroundServer) -> None:
    assert server.service.metrics.http_port is None


def test_serve_flags_configure_the_endpoint() -> None:
    config = server_config(cli.build_parser().parse_args(["serve", "--metrics-port", "9464"]))
    assert (config.metrics_port, config.metrics_host) == (9464, None)  # None: gRPC's host
    config = server_config(cli.build_parser().parse_args(["serve", "--metrics-port=9464", "--metrics-host=0.0.0.0"]))
    assert config.metrics_host == "0.0.0.0"
    assert server_config(cli.build_parser().parse_args(["serve"])).metrics_port is None  # 0 (default): off


def test_every_result_carries_the_servers_timings(metered: BackgroundServer) -> None:
    with EmbeddingClient(metered.address) as client:
        result = client.extract([png_bytes(noise_image(56, 56)), png_bytes(noise_image(84, 56, seed=1))])
        streamed = next(iter(client.extract_many([png_bytes(noise_image(56, 56))])))
    assert isinstance(streamed, Embeddings)
    assert result.split_by_image()[1].timings == result.timings
    for timings in (result.timings, streamed.timings):
        assert timings is not None
        assert timings.batch_size == 1
        assert min(timings.queue_ms, timings.preprocess_ms, timings.model_ms) > 0
        assert timings.queue_ms + timings.preprocess_ms + timings.model_ms <= timings.total_ms


def test_timings_are_none_when_the_server_sends_none() -> None:
    def built(metadata: pb.ResponseMetadata) -> Timings | None:
        builder = ResultBuilder()
        builder.add(pb.EmbeddingResponse(metadata=metadata, last=True))
        return builder.build().timings

    assert built(pb.ResponseMetadata(sequence_length=3)) is None
    sent = pb.Timings(queue_ms=1.5, preprocess_ms=2.0, model_ms=3.0, total_ms=7.0, batch_size=2)
    assert built(pb.ResponseMetadata(sequence_length=3, timings=sent)) == Timings(1.5, 2.0, 3.0, 7.0, 2)
