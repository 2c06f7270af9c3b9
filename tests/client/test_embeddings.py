"""The typed result: access, per-image split, saving, and assembly from a response stream."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from qwen25vl_embed import Embeddings, codec
from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.codec import CodecError
from qwen25vl_embed.v1 import embed_pb2 as pb

# Two images with different grids: 1x4x6 = 24 patches -> 6 tokens, 1x2x4 = 8 patches -> 2 tokens.
GRID = np.array([[1, 4, 6], [1, 2, 4]], dtype=np.int64)
LENS = np.array([6, 2], dtype=np.int64)
POSITIONS = np.array([3, 4, 5, 6, 7, 8, 12, 13], dtype=np.int64)
T, CV, D = 20, 5, 3
SPLIT_NAMES = {"vision_tokens", "vision_layer_-1", "vision_layer_2", "projected_tokens", "lm_image_tokens"}
FUSED_NAMES = {
    "lm_last_hidden",
    "lm_layer_3",
    "vision_pooled_mean",
    "projected_pooled_mean",
    "lm_pooled_mean",
    "lm_image_pooled_mean",
    "lm_last_token",
}
PROPERTY_NAMES = (
    "vision_tokens",
    "projected_tokens",
    "lm_last_hidden",
    "lm_image_tokens",
    "vision_pooled_mean",
    "projected_pooled_mean",
    "lm_pooled_mean",
    "lm_image_pooled_mean",
    "lm_last_token",
)


def _arange(*shape: int, dtype: type = np.float32, start: int = 0) -> np.ndarray:
    return (np.arange(int(np.prod(shape))) + start).astype(dtype).reshape(shape)


def _tensors() -> dict[str, np.ndarray]:
    return {
        "vision_tokens": _arange(32, CV),
        "vision_layer_-1": _arange(32, CV, start=1000),
        "vision_layer_2": _arange(32, CV, start=2000),
        "projected_tokens": _arange(8, D, start=3000),
        "lm_image_tokens": _arange(8, D, start=4000),
        "lm_last_hidden": _arange(1, T, D, start=5000),
        "lm_layer_3": _arange(1, T, D, start=6000),
        "vision_pooled_mean": _arange(1, CV),
        "projected_pooled_mean": _arange(1, D),
        "lm_pooled_mean": _arange(1, D),
        "lm_image_pooled_mean": _arange(1, D),
        "lm_last_token": _arange(1, D),
        "visual_token_lens": LENS.copy(),
        "image_grid_thw": GRID.copy(),
    }


def _embeddings(tensors: dict[str, np.ndarray] | None = None) -> Embeddings:
    return Embeddings(
        tensors=_tensors() if tensors is None else tensors,
        visual_token_lens=LENS,
        image_grid_thw=GRID,
        image_token_positions=POSITIONS,
        sequence_length=T,
        request_id="req-1",
    )


# --- access ------------------------------------------------------------------------------------


def test_named_properties_and_item_access() -> None:
    emb = _embeddings()
    tensors = _tensors()
    assert emb.names == tuple(tensors)
    assert emb.num_images == 2
    for name in SPLIT_NAMES | FUSED_NAMES:
        assert name in emb
        np.testing.assert_array_equal(emb[name], tensors[name])
    for name in PROPERTY_NAMES:
        assert getattr(emb, name) is emb[name]
    assert list(emb) == list(tensors)
    assert len(emb) == len(tensors)


def test_missing_outputs_are_none_and_key_error_lists_names() -> None:
    emb = _embeddings({"projected_pooled_mean": _arange(1, D)})
    assert emb.vision_tokens is None
    assert emb.lm_last_token is None
    assert "vision_tokens" not in emb
    with pytest.raises(KeyError) as info:
        emb["vision_tokens"]
    message = str(info.value)
    assert "'vision_tokens'" in message
    assert "available: projected_pooled_mean" in message


def test_result_is_immutable_but_leaves_callers_arrays_writeable() -> None:
    tensors = _tensors()
    emb = _embeddings(tensors)
    with pytest.raises(dataclasses.FrozenInstanceError):
        emb.request_id = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        emb.tensors["new"] = np.zeros(1)  # type: ignore[index]
    for array in (emb["vision_tokens"], emb.visual_token_lens, emb.image_grid_thw, emb.image_token_positions):
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0
    tensors["vision_tokens"][0, 0] = -1.0  # the caller's array: still writeable, and shared
    assert emb["vision_tokens"][0, 0] == -1.0
    assert "vision_tokens: [32, 5] float32" in repr(emb)


def test_metadata_is_validated() -> None:
    with pytest.raises(ValueError, match="image_grid_thw"):
        Embeddings({}, LENS, GRID[:1], POSITIONS, T)
    with pytest.raises(ValueError, match="image_grid_thw"):
        Embeddings({}, LENS, GRID[:, :2], POSITIONS, T)
    with pytest.raises(ValueError, match="integers"):
        Embeddings({}, LENS.astype(np.float32), GRID, POSITIONS, T)
    emb = Embeddings({}, [6, 2], [[1, 4, 6], [1, 2, 4]], list(POSITIONS), T)  # type: ignore[arg-type]
    assert emb.visual_token_lens.dtype == np.int64
    assert emb.image_grid_thw.shape == (2, 3)


# --- split_by_image ----------------------------------------------------------------------------


def test_split_by_image_separates_token_tensors() -> None:
    emb = _embeddings()
    tensors = _tensors()
    first, second = emb.split_by_image()
    patch_rows = [slice(0, 24), slice(24, 32)]
    token_rows = [slice(0, 6), slice(6, 8)]
    for i, part in enumerate((first, second)):
        assert set(part.names) == SPLIT_NAMES | {"visual_token_lens", "image_grid_thw"}
        for name in ("vision_tokens", "vision_layer_-1", "vision_layer_2"):
            np.testing.assert_array_equal(part[name], tensors[name][patch_rows[i]])
        for name in ("projected_tokens", "lm_image_tokens"):
            np.testing.assert_array_equal(part[name], tensors[name][token_rows[i]])
        np.testing.assert_array_equal(part.visual_token_lens, LENS[i : i + 1])
        np.testing.assert_array_equal(part["visual_token_lens"], LENS[i : i + 1])
        np.testing.assert_array_equal(part.image_grid_thw, GRID[i : i + 1])
        np.testing.assert_array_equal(part["image_grid_thw"], GRID[i : i + 1])
        np.testing.assert_array_equal(part.image_token_positions, POSITIONS[token_rows[i]])
        assert part.sequence_length == T
        assert part.request_id == "req-1"
        assert part.num_images == 1
        assert part.lm_last_hidden is None
        assert part.lm_last_token is None
    for name in SPLIT_NAMES:
        np.testing.assert_array_equal(np.concatenate([first[name], second[name]]), tensors[name])


def test_split_by_image_rejects_tensors_that_disagree_with_metadata() -> None:
    tensors = _tensors()
    tensors["vision_tokens"] = tensors["vision_tokens"][:31]
    with pytest.raises(ValueError, match=r"'vision_tokens' has 31 rows .* 32 patches"):
        _embeddings(tensors).split_by_image()
    tensors = _tensors()
    tensors["projected_tokens"] = tensors["projected_tokens"][:7]
    with pytest.raises(ValueError, match=r"'projected_tokens' has 7 rows .* 8 image tokens"):
        _embeddings(tensors).split_by_image()


def test_split_by_image_with_one_image_keeps_everything_per_image() -> None:
    emb = Embeddings({"projected_tokens": _arange(6, D)}, LENS[:1], GRID[:1], POSITIONS[:6], T, request_id="r")
    (part,) = emb.split_by_image()
    np.testing.assert_array_equal(part["projected_tokens"], emb["projected_tokens"])


# --- save --------------------------------------------------------------------------------------


def test_save_writes_npy_files_and_manifest(tmp_path: Path) -> None:
    tensors = _tensors()
    del tensors["visual_token_lens"], tensors["image_grid_thw"]  # written from metadata anyway
    emb = _embeddings(tensors)
    outdir = emb.save(tmp_path / "out" / "img", extra_manifest={"image": "cat.png", "prompt": None})

    assert outdir == tmp_path / "out" / "img"
    text = (outdir / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert manifest["format_version"] == 1
    assert manifest["request_id"] == "req-1"
    assert manifest["sequence_length"] == T
    assert manifest["visual_token_lens"] == [6, 2]
    assert manifest["image_grid_thw"] == [[1, 4, 6], [1, 2, 4]]
    assert manifest["image"] == "cat.png"
    assert manifest["prompt"] is None
    expected = {**tensors, "visual_token_lens": LENS, "image_grid_thw": GRID}
    assert set(manifest["files"]) == set(expected)
    for name, array in expected.items():
        entry = manifest["files"][name]
        assert entry == {"file": f"{name}.npy", "shape": list(array.shape), "dtype": array.dtype.name}
        loaded = np.load(outdir / entry["file"], allow_pickle=False)
        assert loaded.dtype == array.dtype
        np.testing.assert_array_equal(loaded, array)
    written = sorted(p.name for p in outdir.iterdir())
    assert written == sorted([*(f"{n}.npy" for n in expected), "manifest.json"])  # no temporary files left


def test_save_upcasts_bfloat16_to_float32(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.5, 3.140625, 1e-3]], dtype=np.float32).astype(ml_dtypes.bfloat16)
    emb = _embeddings({"lm_last_token": values, "lm_pooled_mean": np.ones((1, 4), np.float16)})
    emb.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"]["lm_last_token"] == {
        "file": "lm_last_token.npy",
        "shape": [1, 4],
        "dtype": "bfloat16",
        "saved_dtype": "float32",
    }
    assert "saved_dtype" not in manifest["files"]["lm_pooled_mean"]
    loaded = np.load(tmp_path / "lm_last_token.npy", allow_pickle=False)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, values.astype(np.float32))
    assert np.load(tmp_path / "lm_pooled_mean.npy").dtype == np.float16


def test_save_refuses_manifest_key_clashes_and_unsafe_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="files"):
        _embeddings().save(tmp_path / "a", extra_manifest={"files": {}})
    with pytest.raises(ValueError, match="file name"):
        _embeddings({"../escape": np.zeros(1, np.float32)}).save(tmp_path / "b")
    with pytest.raises(TypeError):
        _embeddings().save(tmp_path / "c", extra_manifest={"when": object()})
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "c").exists()
    assert not (tmp_path.parent / "escape.npy").exists()


def test_save_of_each_image_part(tmp_path: Path) -> None:
    for i, part in enumerate(_embeddings().split_by_image()):
        part.save(tmp_path / f"image_{i}")
    manifest = json.loads((tmp_path / "image_1" / "manifest.json").read_text())
    assert manifest["visual_token_lens"] == [2]
    assert manifest["files"]["projected_tokens"]["shape"] == [2, D]
    np.testing.assert_array_equal(np.load(tmp_path / "image_1" / "vision_tokens.npy"), _tensors()["vision_tokens"][24:])


# --- from the response stream ------------------------------------------------------------------


def _metadata() -> pb.ResponseMetadata:
    return pb.ResponseMetadata(
        visual_token_lens=LENS.tolist(),
        image_grid_thw=[pb.ImageGrid(t=t, h=h, w=w) for t, h, w in GRID.tolist()],
        image_token_positions=POSITIONS.tolist(),
        sequence_length=T,
    )


def _stream(tensors: dict[str, np.ndarray], message_bytes: int = 4096) -> list[pb.EmbeddingResponse]:
    responses = [pb.EmbeddingResponse(request_id="req-9", metadata=_metadata())]
    for batch in codec.pack(tensors, message_bytes):
        responses.append(pb.EmbeddingResponse(request_id="req-9", tensors=batch))
    return [pb.EmbeddingResponse.FromString(r.SerializeToString()) for r in responses]


def test_from_response_stream_rebuilds_tensors_and_metadata() -> None:
    tensors = _tensors()
    hidden = np.random.default_rng(1).standard_normal((1, 300, 8))
    tensors["lm_last_hidden"] = hidden.astype(ml_dtypes.bfloat16)
    responses = _stream(tensors)
    assert len(responses) > 3  # metadata, then split tensors
    emb = Embeddings.from_response_stream(responses)
    assert emb.request_id == "req-9"
    assert emb.sequence_length == T
    np.testing.assert_array_equal(emb.visual_token_lens, LENS)
    np.testing.assert_array_equal(emb.image_grid_thw, GRID)
    np.testing.assert_array_equal(emb.image_token_positions, POSITIONS)
    assert emb.names == tuple(tensors)
    for name, array in tensors.items():
        assert emb[name].dtype == array.dtype
        assert emb[name].tobytes() == array.tobytes()


def test_metadata_may_share_the_first_response_with_tensors() -> None:
    first, *rest = _stream({"lm_last_token": np.ones((1, 4), np.float32)})
    first.tensors.extend(rest[0].tensors)
    emb = Embeddings.from_response_stream([first])
    np.testing.assert_array_equal(emb["lm_last_token"], np.ones((1, 4), np.float32))


def test_stream_without_results_has_empty_metadata() -> None:
    emb = Embeddings.from_response_stream([pb.EmbeddingResponse(metadata=pb.ResponseMetadata())])
    assert emb.names == ()
    assert emb.num_images == 0
    assert emb.image_grid_thw.shape == (0, 3)
    assert emb.split_by_image() == []


def test_malformed_streams_raise_codec_error() -> None:
    responses = _stream(_tensors())
    with pytest.raises(CodecError, match="before its first response"):
        Embeddings.from_response_stream([])
    with pytest.raises(CodecError, match="no metadata"):
        Embeddings.from_response_stream(responses[1:])
    with pytest.raises(CodecError, match="again"):
        Embeddings.from_response_stream([responses[0], *responses])
    split = _stream({"big": np.arange(3000, dtype=np.float32)})
    assert len(split[-1].tensors) == 1
    assert split[-1].tensors[0].offset > 0
    with pytest.raises(CodecError, match="complete: big"):
        Embeddings.from_response_stream(split[:-1])
    builder = ResultBuilder()
    for response in responses:
        builder.add(response)
    with pytest.raises(CodecError, match="twice"):
        builder.add(responses[1])
