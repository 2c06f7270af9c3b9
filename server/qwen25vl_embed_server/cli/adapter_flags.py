"""``--adapter``: retrieval adapters on the served base (``serve``, ``bulk``, in-process ``extract``:
NAME=PATH) or the one a request runs with (``extract --server``: NAME). Checked at start-up, each
refusal naming the flag."""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec, check_adapter_name

ADAPTER_HELP = (
    "a retrieval adapter served on the --model base as NAME: a ColQwen2.5 / BiQwen2.5 PEFT LoRA folder, or a "
    "jina-embeddings-v4 folder (its task LoRAs; requests also name a task) whose base weights are the --model's "
    "(repeatable: the base is in memory once); requests name it, a request naming none gets the base's raw outputs"
)


def adapter_flag(parser: argparse.ArgumentParser, help_text: str = ADAPTER_HELP) -> None:
    parser.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH", help=help_text)


def adapters_of(args: argparse.Namespace) -> tuple[AdapterSpec, ...]:
    """The ``--adapter NAME=PATH`` flags as specs. Raises ValueError naming the flag: not
    NAME=PATH, a bad name, a name given twice, a path that is not a folder."""
    specs: list[AdapterSpec] = []
    for value in getattr(args, "adapter", None) or ():
        try:
            spec = AdapterSpec.parse(value)
        except ValueError as err:
            raise ValueError(f"--adapter {value}: {err}") from None
        if not Path(spec.path).is_dir():
            raise ValueError(f"--adapter {value}: {spec.path} is not a folder")
        if any(spec.name == other.name for other in specs):
            raise ValueError(f"--adapter {value}: the name {spec.name!r} is given twice")
        specs.append(spec)
    return tuple(specs)


def adapter_name_of(value: str | None) -> str:
    """``extract --server --adapter NAME``: the name sent with each request ("" for none)."""
    if not value:
        return ""
    try:
        return check_adapter_name(value)
    except ValueError as err:
        raise ValueError(f"--adapter {value}: {err} (with --server, name one of the server's adapters)") from None
