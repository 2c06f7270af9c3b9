"""``--prompt-format`` of ``extract`` and ``bulk``: how each image becomes the model's input.

``auto`` picks ``document`` (the retrieval recipe's document template, as ``embed_images`` sends)
when the model, or the ``--adapter`` named, has a retrieval recipe, else ``chat`` (the chat
template with ``--prompt``). Standard library only: ``extract --server`` imports it.
"""

from __future__ import annotations

import argparse

PROMPT_FORMAT_CHOICES = ("auto", "chat", "raw", "document")


def prompt_format_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMAT_CHOICES,
        default="auto",
        help="how each image becomes the model's input: chat (the chat template with --prompt), raw (--prompt as "
        "the whole text, <image> where the image goes), document (the retrieval recipe's document template, as "
        "embed_images; no --prompt); auto: document for a model or --adapter with a retrieval recipe, else chat",
    )


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--prompt`` and ``--prompt-format`` together, before any model loads."""
    if args.prompt_format == "document" and args.prompt is not None:
        return "--prompt with --prompt-format document: the document template has no prompt; drop one of them"
    if args.prompt_format == "raw" and args.prompt is None:
        return "--prompt-format raw needs --prompt (the whole text, with <image> where the image goes)"
    return None


def resolve(args: argparse.Namespace, has_recipe: bool) -> str:
    """The format the requests carry: ``auto`` resolved for a model with (or without) a recipe.

    Raises:
        ValueError: ``auto`` chose ``document`` and ``--prompt`` is given (naming both flags).
    """
    chosen: str = args.prompt_format
    if chosen == "auto":
        chosen = "document" if has_recipe else "chat"
        if chosen == "document" and args.prompt is not None:
            raise ValueError(
                "--prompt with --prompt-format auto, which is document for this retrieval model: the document "
                "template has no prompt; drop --prompt, or give --prompt-format chat"
            )
    return chosen


def prompt_for(args: argparse.Namespace, prompt_format: str) -> str | None:
    """The prompt the requests carry in ``prompt_format`` (None: the format's own, none for document)."""
    return None if prompt_format == "document" else args.prompt
