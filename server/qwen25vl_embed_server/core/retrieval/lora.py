"""LoRA adapters kept beside the base weights, several on one model, chosen per batch row.

A targeted linear layer of the base becomes a :class:`MultiLoraLinear`: the base layer (shared,
in memory once) plus each LoRA's factors, by key. Its output for a row of LoRA ``k`` is
``base(x) + B_k(A_k(x)) * scale_k``, as peft computes an unmerged LoRA layer; a row of no LoRA
gets ``base(x)``. Which LoRA each row of the running forward has is set per thread
(:func:`adapter_rows`): two model lanes run different batches through the same modules at once.

One module serves every kind: a ColQwen2.5 / BiQwen2.5 adapter is one LoRA (key: its name); a
multi-task adapter (jina-embeddings-v4) is one LoRA per task (key :func:`lora_key`, its name and
the task). Rows of one LoRA that sit side by side share one pair of matmuls on a view of the batch
(callers put a batch's rows in LoRA order: :func:`lora_order`); a batch of one LoRA runs it once.

Files read: a PEFT LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``), keys
``base_model.model.<module>.lora_A[.<task>].weight`` [r, in] and ``...lora_B...`` [out, r].
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<task>[^.]+))?\.weight$")
_state = threading.local()


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: ``down`` (A) [r, in], ``up`` (B) [out, r], ``scale`` (alpha / r)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scale``: what peft's merge adds to the base weight [out, in]."""
        return (self.up @ self.down) * self.scale


def read_factors(
    folder: str, key_mapping: dict[str, str], task: str | None = None
) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """``(factors, full)``: an adapter folder's LoRA factors by module name (the base's names,
    ``key_mapping`` applied) and any whole tensors it replaces (``modules_to_save``: parameter
    name -> tensor). ``task``: the factors of one task of a multi-task file (None: untasked keys).

    Raises:
        ValueError: a LoRA variant these layers do not compute (DoRA, per-module ranks, fan-in-fan-out
            weights, embedding LoRA), or an A without its B.
    """
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    for setting, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights")):
        if config.get(setting):
            raise ValueError(f"adapter {folder}: {what} is not supported (plain LoRA only)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"adapter {folder}: per-module ranks (rank_pattern / alpha_pattern) are not supported")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    halves: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as opened:
        for key in opened.keys():  # noqa: SIM118 - safe_open is not a mapping
            name = _rename(key.removeprefix(PREFIX), key_mapping)
            match = _FACTOR.match(name)
            if match is None:
                if "lora_" in name:
                    raise ValueError(f"adapter {folder}: weight {key} is not a LoRA factor these layers compute")
                full[name] = opened.get_tensor(key)
            elif match["task"] == task:
                halves.setdefault(match["module"], {})[match["factor"]] = opened.get_tensor(key)
    factors = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter {folder}: module {module} has lora_{''.join(pair)} alone")
        factors[module] = LoraFactors(down=pair["A"], up=pair["B"], scale=scale)
    return factors, full


def _rename(name: str, key_mapping: dict[str, str]) -> str:
    for pattern, replacement in key_mapping.items():
        name, count = re.subn(pattern, replacement, name)
        if count:
            break
    return name


class MultiLoraLinear(nn.Module):
    """A base linear layer with several LoRAs' factors beside it (see the module docstring)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.down: dict[str, torch.Tensor] = {}
        self.up: dict[str, torch.Tensor] = {}
        self.scale: dict[str, float] = {}

    def add(self, name: str, factors: LoraFactors) -> None:
        """Attach LoRA ``name``'s factors (on the base's device and dtype)."""
        weight = self.base.weight
        self.down[name] = factors.down.to(weight.device, weight.dtype)
        self.up[name] = factors.up.to(weight.device, weight.dtype)
        self.scale[name] = factors.scale

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.base(inputs)
        runs: tuple[Run, ...] = getattr(_state, "runs", ())
        if not runs:
            return result
        if len(runs) == 1:  # one LoRA (or none) for the whole batch: no slicing
            name = runs[0].name
            return result if name not in self.down else result + self._delta(name, inputs)
        if runs[-1].stop != inputs.shape[0]:
            raise RuntimeError(f"LoRA rows for {runs[-1].stop} batch rows, but the batch has {inputs.shape[0]}")
        if result.requires_grad:  # autograd records this forward: no in-place writes
            return torch.cat([self._added(result, inputs, run) for run in runs])
        for run in runs:  # each LoRA on its rows' slice, added to the base's output in place
            if run.name in self.down:
                delta = self._delta(run.name, inputs.narrow(0, run.start, run.size))
                result.narrow(0, run.start, run.size).add_(delta)
        return result

    def _added(self, result: torch.Tensor, inputs: torch.Tensor, run: Run) -> torch.Tensor:
        part = result.narrow(0, run.start, run.size)
        if run.name not in self.down:
            return part
        return part + self._delta(run.name, inputs.narrow(0, run.start, run.size))

    def _delta(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        # peft's unmerged LoRA: lora_B(lora_A(x)) * scaling (dropout is off at inference).
        down = nn.functional.linear(inputs, self.down[name])
        return nn.functional.linear(down, self.up[name]) * self.scale[name]

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, adapters={', '.join(self.down) or 'none'}"


@dataclass(frozen=True)
class Run:
    """Consecutive batch rows ``[start, stop)`` of one LoRA (``name``; None: the base alone)."""

    name: str | None
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def runs_of(rows: Sequence[str | None]) -> tuple[Run, ...]:
    """``rows`` (each batch row's LoRA key) as runs of consecutive equal keys."""
    runs: list[Run] = []
    for index, name in enumerate(rows):
        if runs and runs[-1].name == name:
            runs[-1] = Run(name, runs[-1].start, index + 1)
        else:
            runs.append(Run(name, index, index + 1))
    return tuple(runs)


def lora_key(adapter: str | None, task: str = "") -> str | None:
    """The key of the LoRA a request computes with: its adapter's name, with its task for a
    multi-task adapter (``NAME:TASK``); a task alone for a multi-task model served by itself;
    None: the base."""
    if adapter and task:
        return f"{adapter}:{task}"
    return adapter or task or None


def lora_order(keys: Sequence[str | None]) -> list[int]:
    """Indices of ``keys`` with each LoRA's rows side by side (in order of first appearance,
    stable): every LoRA then runs once per layer, on a contiguous slice of the batch."""
    first: dict[str | None, int] = {}
    for position, key in enumerate(keys):
        first.setdefault(key, position)
    return sorted(range(len(keys)), key=lambda index: (first[keys[index]], index))


@contextmanager
def adapter_rows(rows: Sequence[str | None]) -> Iterator[None]:
    """On this thread, for the forwards inside: batch row ``i`` uses LoRA ``rows[i]`` (None: the
    base). Rows of one LoRA side by side compute together (:func:`lora_order`)."""
    previous = getattr(_state, "runs", ())
    _state.runs = runs_of(rows)
    try:
        yield
    finally:
        _state.runs = previous


def install(root: nn.Module, module_name: str) -> MultiLoraLinear:
    """The :class:`MultiLoraLinear` at ``module_name`` under ``root``, made from the base linear
    layer there on first use. Raises ValueError when there is no linear layer by that name."""
    parent_name, _, child = module_name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
        layer = getattr(parent, child)
    except AttributeError:
        raise ValueError(f"the base has no module {module_name}") from None
    if isinstance(layer, MultiLoraLinear):
        return layer
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"the base's {module_name} is a {type(layer).__name__}, not a linear layer")
    wrapped = MultiLoraLinear(layer)
    setattr(parent, child, wrapped)
    return wrapped


def check_fits(module_name: str, layer: Any, factors: LoraFactors) -> str | None:
    """Why ``factors`` cannot sit on ``layer`` (shapes), or None when they fit."""
    rank = factors.down.shape[0]
    want_down, want_up = (rank, layer.in_features), (layer.out_features, rank)
    if tuple(factors.down.shape) != want_down or tuple(factors.up.shape) != want_up:
        return (
            f"{module_name}: LoRA A {tuple(factors.down.shape)} / B {tuple(factors.up.shape)} do not fit "
            f"the base's layer ({layer.in_features} -> {layer.out_features})"
        )
    return None
