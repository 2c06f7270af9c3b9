"""Whether a hub id can be fetched from the Hugging Face Hub, asked once and briefly before loading.

transformers fetches a checkpoint file by file, and huggingface_hub retries each file it cannot
reach and has no cached copy of (about 23 s of backoff per file): on a machine without the hub,
minutes pass before the error. One HEAD of the checkpoint's ``config.json``, with the library's own
request and timeout, tells at once; a checkpoint already in the hub cache then loads from there.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, is_offline_mode, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # public; exported lazily

log = logging.getLogger(__name__)

_SET_UP_SECONDS = 5.0

OFFLINE_CHOICES = (
    "give a local checkpoint folder or 'tiny-random' as the model, or HF_HUB_OFFLINE=1 with it in the hub cache"
)
"""The ways to load a model without the hub, as the messages name them."""


class HubUnreachableError(OSError):
    """The hub did not answer, and the model is not in the hub cache here. The message is one line
    naming the hub's address, the cause and :data:`OFFLINE_CHOICES`."""


def reachable_source(model: str, timeout: float | None = None) -> str:
    """What to load ``model`` (a hub id or a local folder) from: ``model`` itself, or the folder
    of its snapshot in the hub cache when the hub cannot be reached.

    A local folder, a name that is no hub id, and offline mode (``HF_HUB_OFFLINE=1``: the
    libraries read the cache themselves) are returned as they are, with nothing asked. Otherwise
    the hub is asked for ``config.json`` once, with a ``timeout`` in seconds (default:
    huggingface_hub's ``HF_HUB_ETAG_TIMEOUT``, 10 s) and waited for at most 5 s longer, name
    resolution included. Any answer, an error status too (a missing or gated repository:
    transformers then says which), returns ``model``.

    Raises:
        HubUnreachableError: no answer, and the model is not in the hub cache.
    """
    if Path(model).is_dir() or is_offline_mode() or not _is_hub_id(model):
        return model
    wait = float(constants.HF_HUB_ETAG_TIMEOUT) if timeout is None else timeout
    problem = _unanswered(model, wait)
    if problem is None:
        return model
    hub = f"the hub at {constants.ENDPOINT} cannot be reached ({problem})"
    try:
        # A folder on disk from here on: no library asks the hub again for any of its files.
        folder = snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError:
        raise HubUnreachableError(
            f"{hub} and the model is not in the hub cache here; without the hub, {OFFLINE_CHOICES}"
        ) from None
    log.warning("%s; loading %s from the hub cache (%s)", hub, model, folder)
    return str(folder)


def _is_hub_id(model: str) -> bool:
    try:
        validate_repo_id(model)
    except HFValidationError:  # a path that does not exist, e.g. "./model": transformers says so
        return False
    return True


def _unanswered(model: str, timeout: float) -> str | None:
    """None when the hub answered a HEAD of ``model``'s config.json within ``timeout`` seconds;
    else why not, in a few words."""
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            get_hf_file_metadata(hf_hub_url(model, constants.CONFIG_NAME), timeout=timeout)
        except HfHubHTTPError:  # an answer, if not a welcome one
            outcome.append(None)
        except Exception as err:  # no answer: name resolution, refused, timed out, proxy, TLS
            outcome.append(" ".join(f"{type(err).__name__}: {err}".split()))
        else:
            outcome.append(None)

    # The request's timeout bounds connecting and reading, not name resolution: the thread's join
    # bounds the whole question, with room for the first request's set-up (its TLS context). A
    # thread left behind ends with its own timeouts.
    asking = threading.Thread(target=ask, name="hub-check", daemon=True)
    asking.start()
    deadline = timeout + _SET_UP_SECONDS
    asking.join(deadline)
    return outcome[0] if outcome else f"no answer within {deadline:g} s"
