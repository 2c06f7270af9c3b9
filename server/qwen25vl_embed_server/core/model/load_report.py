"""What loading found: each checkpoint's weights against the model, and the recipe's grounds.

A checkpoint that leaves weights newly initialised (missing), carries weights that fit no module
(unexpected) or weights of another shape (mismatched) would serve a partly random model. Such a
load is refused (:func:`require_complete`) unless the caller allows it, and then it is logged.
The key lists come from the libraries' own loading reports: transformers' ``from_pretrained(...,
output_loading_info=True)`` for a checkpoint, peft's ``load_adapter`` for an adapter. Weights a
model leaves out on purpose (tied weights, non-persistent buffers, the patterns a class declares
in ``_keys_to_ignore_on_load_unexpected``) are not in those reports.

Torch-free: plain values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

KEYS_NAMED = 3
"""How many keys of each kind a message names (then the count)."""

ALLOW_HINT = "--allow-partial-weights loads it anyway"


@dataclass(frozen=True)
class WeightCheck:
    """One checkpoint's (or adapter's) weights against the model they were loaded into.

    ``kind``: "checkpoint" or "adapter". ``matched``: the model's weights (for an adapter: its
    LoRA weights) that the file filled. ``missing``: the model's weights the file lacks (left as
    initialised); ``unexpected``: the file's weights that fit no module; ``mismatched``: present
    with another shape. Keys sorted, as the model names them.
    """

    kind: str
    source: str
    matched: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        kind: str,
        source: str,
        expected: int,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
    ) -> WeightCheck:
        """From a loading report: ``expected`` is how many weights the model (or adapter) has."""
        missing_, mismatched_ = tuple(sorted(set(missing))), tuple(sorted(set(mismatched)))
        return cls(
            kind=kind,
            source=source,
            matched=expected - len(missing_) - len(mismatched_),
            missing=missing_,
            unexpected=tuple(sorted(set(unexpected))),
            mismatched=mismatched_,
        )

    @classmethod
    def of_checkpoint(cls, source: str, model: Any, info: Mapping[str, Any]) -> WeightCheck:
        """From transformers' ``from_pretrained(..., output_loading_info=True)``: ``(model, info)``."""
        return cls.of(
            "checkpoint",
            source,
            expected=len(model.state_dict()),
            missing=info["missing_keys"],
            unexpected=info["unexpected_keys"],
            mismatched=(key for key, *_ in info["mismatched_keys"]),
        )

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problem(self) -> str:
        """One line: what is wrong, naming the first few keys of each kind and their counts."""
        parts = []
        for keys, what in (
            (self.missing, "missing (newly initialised)"),
            (self.unexpected, "unexpected (match no module)"),
            (self.mismatched, "of another shape"),
        ):
            if keys:
                named = ", ".join(keys[:KEYS_NAMED]) + (", ..." if len(keys) > KEYS_NAMED else "")
                parts.append(f"{len(keys)} {what}: {named}")
        return f"{self.kind} {self.source}: {'; '.join(parts)}"


@dataclass(frozen=True)
class LoadReport:
    """What loading found, for a caller to show (e.g. a model check).

    ``recipe``: the recipe in force (None: raw states) and ``recipe_reason``: why (the flag, or
    what the checkpoint says). ``base``: where the weights came from; ``adapter``: the LoRA adapter
    merged into them, if any. ``weights``: one :class:`WeightCheck` per file set loaded.
    """

    recipe: str | None
    recipe_reason: str
    base: str
    adapter: str | None
    weights: tuple[WeightCheck, ...]

    @property
    def complete(self) -> bool:
        return all(check.complete for check in self.weights)


def require_complete(check: WeightCheck, allow_partial: bool) -> None:
    """Raise ValueError (one line) unless ``check`` is complete; with ``allow_partial``, log a warning."""
    if check.complete:
        return
    if not allow_partial:
        raise ValueError(f"{check.problem()}; refusing to serve a partly random model ({ALLOW_HINT})")
    log.warning("%s; loaded anyway (partial weights allowed)", check.problem())


class _TableFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def one_line_reports() -> Iterator[None]:
    """Within: transformers' multi-line loading-report table is not logged (the checks here say the
    same in one line); its other messages are."""
    logger, table = logging.getLogger("transformers.modeling_utils"), _TableFilter()
    logger.addFilter(table)
    try:
        yield
    finally:
        logger.removeFilter(table)
