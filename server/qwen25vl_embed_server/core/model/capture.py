"""Forward hooks that capture the vision tower's and the language model's internals.

Hooks only keep references to tensors the forward computes anyway; they never change it. Every
handle is removed when the ``with`` block ends, also when the forward raised. Several threads may
run the model at once (the model lanes, :mod:`~.model_lanes`): a hook hears only forwards on the
thread that installed it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen25vl_embed_server.core.model.outputs import OutputPlan
from qwen25vl_embed_server.core.model.window_order import to_image_order, window_index


@dataclass
class Captured:
    """Tensors seen during one forward. Vision tensors are still in window order here."""

    projected: torch.Tensor | None = None
    merger_input: torch.Tensor | None = None
    vision_blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    lm_layers: dict[int, torch.Tensor] = field(default_factory=dict)

    def vision_in_image_order(
        self, visual: Any, grid_thw: torch.Tensor, merge_unit: int
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The merger's input and the captured blocks' outputs, in image (patch) order, for a
        forward over the images of ``grid_thw``."""
        if self.merger_input is None and not self.vision_blocks:
            return None, {}
        order = window_index(visual, grid_thw)
        tokens = None if self.merger_input is None else to_image_order(self.merger_input, order, merge_unit)
        return tokens, {k: to_image_order(block, order, merge_unit) for k, block in self.vision_blocks.items()}


def _first(output: Any) -> torch.Tensor:
    """A module's main output tensor (modules return a tensor or a tuple led by one)."""
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def capturing(visual: Any, language_model: Any, plan: OutputPlan) -> Iterator[Captured]:
    """Hook ``visual`` (and ``language_model`` layers) for what ``plan`` needs; yield the captures.

    ``projected`` is the vision tower's merged output in image order (its ``pooler_output``).
    """
    captured = Captured()
    owner = threading.get_ident()

    def mine(hook: Callable[..., None]) -> Callable[..., None]:
        """``hook``, deaf to forwards on other threads (another lane's run of the same modules)."""

        def on_own_thread(*args: Any) -> None:
            if threading.get_ident() == owner:
                hook(*args)

        return on_own_thread

    def on_visual(_module: Any, _args: Any, output: Any) -> None:
        captured.projected = getattr(output, "pooler_output", None)
        if captured.projected is None:  # transformers versions whose tower returns the tensor
            captured.projected = _first(output)

    def on_merger(_module: Any, args: tuple[Any, ...]) -> None:
        captured.merger_input = args[0]

    def on_block(k: int, into: dict[int, torch.Tensor]) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            into[k] = _first(output)

        return hook

    with ExitStack() as handles:
        handles.callback(visual.register_forward_hook(mine(on_visual)).remove)
        if plan.needs_vision_tokens:
            handles.callback(visual.merger.register_forward_pre_hook(mine(on_merger)).remove)
        for k in plan.vision_layers:
            handle = visual.blocks[k].register_forward_hook(mine(on_block(k, captured.vision_blocks)))
            handles.callback(handle.remove)
        for k in plan.lm_layers:
            handle = language_model.layers[k].register_forward_hook(mine(on_block(k, captured.lm_layers)))
            handles.callback(handle.remove)
        yield captured
