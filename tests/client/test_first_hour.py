"""The SDK as a new user meets it: per-request pixel range, wait_ready, saved files,
split_by_image's shared outputs, local errors told apart from the server's."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from qwen25vl_embed import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError, Embeddings, LocalRequestError
from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.server import RunningServer, create_server

from ..helpers import noise_image, png_bytes, server_config

# 448x448 -> 32x32 patches -> 256 image tokens at the tiny model's range [3136, 12845056];
# capped at 224x224 pixels -> 16x16 patches -> 64 tokens.
IMAGE = png_bytes(noise_image(448, 448, seed=3))


def test_a_request_may_shrink_its_images_within_the_servers_range(client: EmbeddingClient) -> None:
    assert client.extract(IMAGE).visual_token_lens.tolist() == [256]
    small = client.extract(IMAGE, outputs=["image_grid_thw"], max_pixels=224 * 224)
    assert small.image_grid_thw.tolist() == [[1, 16, 16]]
    assert small.visual_token_lens.tolist() == [64]
    # min_pixels alone upscales a small image (56x56 = 3136 pixels, the server's floor -> 4 tokens).
    tiny = png_bytes(noise_image(56, 56))
    assert client.extract(tiny, min_pixels=112 * 112).visual_token_lens.tolist() == [16]


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"max_pixels": 12845056 + 1}, "max_pixels=12845057 is outside the server's range [3136, 12845056]"),
        ({"min_pixels": 1000}, "min_pixels=1000 is outside the server's range"),
        ({"min_pixels": 50176, "max_pixels": 10000}, "min_pixels=50176 is above max_pixels=10000"),
    ],
    ids=["above-cap", "below-floor", "min-above-max"],
)
def test_a_pixel_range_beyond_the_servers_is_refused(
    client: EmbeddingClient, bounds: dict[str, int], message: str
) -> None:
    with pytest.raises(EmbeddingError, match="INVALID_ARGUMENT") as caught:
        client.extract(IMAGE, min_pixels=bounds.get("min_pixels"), max_pixels=bounds.get("max_pixels"))
    assert message in caught.value.details


def test_concurrent_requests_with_different_ranges_each_get_their_own(
    client: EmbeddingClient, extractor: Extractor
) -> None:
    """The range is an argument of each processor call: requests that share preprocessing
    workers and batches never see each other's, and the server's processor keeps its own."""
    before = dict(extractor.loaded.processor.image_processor.size)
    sides = [112, 168, 224, 280, 336, 392] * 2
    with ThreadPoolExecutor(6) as pool:
        grids = list(
            pool.map(lambda side: client.extract(IMAGE, max_pixels=side * side).image_grid_thw.tolist(), sides)
        )
    assert grids == [[[1, side // 14, side // 14]] for side in sides]
    assert dict(extractor.loaded.processor.image_processor.size) == before


def test_build_request_refuses_a_bound_below_one(client: EmbeddingClient) -> None:
    with pytest.raises(ValueError, match="max_pixels must be at least 1"):
        client.extract(IMAGE, max_pixels=0)


@pytest.fixture
def loading_server(extractor: Extractor) -> Iterator[tuple[RunningServer, asyncio.AbstractEventLoop]]:
    """A real server that listens but has no model yet (health NOT_SERVING), as while loading."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(create_server(server_config()), loop).result()
    yield running, loop
    asyncio.run_coroutine_threadsafe(running.stop(None), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def test_wait_ready_waits_for_the_model_and_times_out_without_it(
    loading_server: tuple[RunningServer, asyncio.AbstractEventLoop], extractor: Extractor
) -> None:
    running, loop = loading_server
    address = f"127.0.0.1:{running.port}"
    with EmbeddingClient(address) as client:
        with pytest.raises(EmbeddingError) as caught:
            client.wait_ready(0.5)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"the server at {address} was not ready within 0.5 s" in caught.value.details
        assert "still loading" in caught.value.details  # the last answer, UNAVAILABLE

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.wait_ready, 120.0)
            asyncio.run_coroutine_threadsafe(running.mark_serving(extractor), loop).result()
            assert waiting.result().model == extractor.loaded.name

    async def aio_wait() -> str:
        async with AsyncEmbeddingClient(address) as aio:
            return (await aio.wait_ready(30.0)).model

    assert asyncio.run(aio_wait()) == extractor.loaded.name


def test_a_call_while_the_model_loads_names_how_to_wait_for_it(
    loading_server: tuple[RunningServer, asyncio.AbstractEventLoop],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running, _ = loading_server
    address = f"127.0.0.1:{running.port}"
    with EmbeddingClient(address) as client:
        with pytest.raises(EmbeddingError) as caught:
            client.extract(IMAGE)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(EmbeddingError) as asked:
            client.info()
    for details in (caught.value.details, asked.value.details):
        assert details.startswith("the model is still loading; "), details
        assert "wait_ready(timeout) in the SDK" in details
        assert "--wait SECONDS on the CLI" in details
    # The command line, which says the server's message as it is.
    image = tmp_path / "cat.png"
    image.write_bytes(IMAGE)
    assert main(["extract", str(image), "--outdir", str(tmp_path / "out"), "--server", address]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: the model is still loading; "), err
    assert "--wait SECONDS" in err


def test_wait_ready_on_an_address_nobody_listens_on_times_out() -> None:
    with EmbeddingClient("127.0.0.1:1") as client, pytest.raises(EmbeddingError) as caught:
        client.wait_ready(0.3)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    async def aio_wait() -> None:
        async with AsyncEmbeddingClient("127.0.0.1:1") as aio:
            await aio.wait_ready(0.3)

    with pytest.raises(EmbeddingError, match=r"not ready within 0\.3 s"):
        asyncio.run(aio_wait())


def test_saved_files_follow_the_umask(tmp_path: Path, client: EmbeddingClient) -> None:
    result = client.extract(IMAGE)
    old = os.umask(0o022)
    try:
        result.save(tmp_path / "shared")
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "shared").iterdir()}
    assert len(modes) == 8, modes  # 5 pooled vectors, visual_token_lens, image_grid_thw, manifest
    assert set(modes.values()) == {0o644}, modes


def test_a_save_over_an_earlier_one_leaves_no_stale_outputs(tmp_path: Path, client: EmbeddingClient) -> None:
    folder = tmp_path / "result"
    client.extract(IMAGE, outputs=["projected_tokens", "lm_last_token"]).save(folder)
    (folder / "notes.npy").write_bytes(b"the user's own file")  # not listed: never touched
    client.extract(IMAGE, outputs=["lm_last_token"]).save(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "image_grid_thw.npy",
        "lm_last_token.npy",
        "manifest.json",
        "notes.npy",
        "visual_token_lens.npy",
    ]


def test_save_records_image_prompt_and_model(
    tmp_path: Path, client: EmbeddingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(IMAGE)
    result = client.extract(image, prompt="A cat.")
    monkeypatch.chdir(tmp_path)  # a relative image path is stored absolute
    result.save(tmp_path / "out", image="cat.png", prompt="A cat.", model="tiny")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["image"], manifest["prompt"], manifest["model"]) == (str(image), "A cat.", "tiny")
    with pytest.raises(ValueError, match="'prompt' is given both"):
        result.save(tmp_path / "again", {"prompt": "x"}, prompt="y")


def test_split_by_image_names_and_can_carry_the_shared_outputs(client: EmbeddingClient) -> None:
    images = [png_bytes(noise_image(56, 56, seed=1)), png_bytes(noise_image(112, 56, seed=2))]
    result = client.extract(images, outputs=["projected_tokens", "lm_last_token"])
    assert result.shared_outputs == ("lm_last_token",)
    parts = result.split_by_image()
    assert [part.names for part in parts] == [("projected_tokens",)] * 2
    carried = result.split_by_image(keep_shared=True)
    for part in carried:
        np.testing.assert_array_equal(part["lm_last_token"], result["lm_last_token"])
    assert [part["projected_tokens"].shape[0] for part in carried] == [4, 8]


def test_local_errors_are_told_apart_from_the_servers(tmp_path: Path, client: EmbeddingClient) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError):
        client.extract(missing)
    with pytest.raises(ValueError, match="dtype must be one of"):
        client.extract(IMAGE, dtype="float64")
    results = list(client.extract_many([IMAGE, missing, b"not an image"], errors="return"))
    assert isinstance(results[0], Embeddings)
    local, remote = results[1], results[2]
    assert isinstance(local, LocalRequestError)
    assert not local.sent
    assert isinstance(local.cause, FileNotFoundError)
    assert "refused here, not sent" in str(local)
    assert isinstance(remote, EmbeddingError)
    assert not isinstance(remote, LocalRequestError)
    assert remote.sent
    assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
