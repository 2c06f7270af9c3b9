"""The per-row LoRA layer: each batch row gets its own LoRA (or none), whatever the rows' order.

The reference is written here as peft's unmerged LoRA layer computes it, one row at a time:
``x W^T + b + (x A^T) B^T * scale``. Rows of one LoRA side by side share one slice; rows in any
other order, rows of the base alone, a batch of one LoRA and a forward that autograd records all
give each row its own LoRA's output (fp32, within float rounding of the batched matmuls).
"""

from __future__ import annotations

import pytest
import torch

from qwen25vl_embed_server.core.retrieval import lora

KEYS = ("colqwen", "jina:retrieval", "jina:code")


@pytest.fixture(scope="module")
def layer() -> lora.MultiLoraLinear:
    generator = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(12, 10)
    wrapped = lora.MultiLoraLinear(base)
    for index, key in enumerate(KEYS):
        down, up = torch.randn(4, 12, generator=generator), torch.randn(10, 4, generator=generator)
        wrapped.add(key, lora.LoraFactors(down=down, up=up, scale=0.5 + index))
    return wrapped


def _expected(layer: lora.MultiLoraLinear, inputs: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    base = layer.base
    out = []
    for row, key in zip(inputs, rows, strict=True):
        value = row @ base.weight.T + base.bias
        if key is not None:
            value = value + (row @ layer.down[key].T) @ layer.up[key].T * layer.scale[key]
        out.append(value)
    return torch.stack(out)


@pytest.mark.parametrize(
    "rows",
    [
        ["jina:code", "colqwen", None, "jina:code", "jina:retrieval", "colqwen"],
        ["colqwen", "colqwen", "jina:code", "jina:code", None, None],
        ["jina:retrieval"] * 6,
        [None] * 6,
    ],
)
@pytest.mark.parametrize("grad", [False, True])
def test_each_row_gets_its_lora(layer: lora.MultiLoraLinear, rows: list[str | None], grad: bool) -> None:
    inputs = torch.randn(6, 5, 12, generator=torch.Generator().manual_seed(5))
    with torch.set_grad_enabled(grad), lora.adapter_rows(rows):
        got = layer(inputs)
    torch.testing.assert_close(got, _expected(layer, inputs, rows), rtol=1e-5, atol=1e-5)


def test_lora_order_puts_each_loras_rows_side_by_side() -> None:
    keys = ["b", None, "a", "b", None, "a", "c"]
    order = lora.lora_order(keys)
    assert [keys[i] for i in order] == ["b", "b", None, None, "a", "a", "c"]
    assert order == [0, 3, 1, 4, 2, 5, 6]
    assert [run.name for run in lora.runs_of([keys[i] for i in order])] == ["b", None, "a", "c"]


def test_lora_keys() -> None:
    assert lora.lora_key("jina", "code") == "jina:code"
    assert lora.lora_key("colqwen") == "colqwen"
    assert lora.lora_key(None, "retrieval") == "retrieval"
    assert lora.lora_key(None) is None


def test_rows_that_do_not_match_the_batch_are_an_error(layer: lora.MultiLoraLinear) -> None:
    with lora.adapter_rows(["colqwen", "jina:code"]), pytest.raises(RuntimeError, match="2 batch rows"):
        layer(torch.zeros(3, 2, 12))
