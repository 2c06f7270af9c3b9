"""What ``--adapter NAME=PATH`` names: an adapter's name and folder. Torch-free: the command line
checks its flags before any model library loads."""

from __future__ import annotations

import re
from dataclasses import dataclass

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""An adapter's name: what requests say (letters, digits, ``-`` and ``_``; at most 64)."""


def check_adapter_name(name: str) -> str:
    """``name`` when it is a valid adapter name, else ValueError saying what one is."""
    if not ADAPTER_NAME.match(name):
        raise ValueError(f"adapter name {name!r}: letters, digits, '-' and '_' (a letter or digit first; 64 at most)")
    return name


@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter NAME=PATH``: the name requests use and the adapter's folder."""

    name: str
    path: str

    @classmethod
    def parse(cls, value: str) -> AdapterSpec:
        """``NAME=PATH`` -> a spec. Raises ValueError naming what is wrong."""
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise ValueError(f"{value!r} is not NAME=PATH")
        return cls(name=check_adapter_name(name), path=path)
