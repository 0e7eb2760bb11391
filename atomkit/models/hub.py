"""Weights that live on the Hugging Face hub (SmolVLM2, open_clip dual encoders): found offline, fetched only on
request.

Every command but ``atomkit fetch`` reads them offline: from a folder the user passes (``--weights DIR``), else
from the Hugging Face cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) with ``local_files_only``.
``fetch(repo_id)`` downloads a snapshot into that cache and is the only code path that touches the network.
"""
from __future__ import annotations

import os
from pathlib import Path

from atomkit.errors import AtomkitError, ModelNotFound


class FetchError(AtomkitError):
    """A snapshot could not be downloaded (offline, the hub unreachable, a repository that does not exist)."""


def hub_cache() -> Path:
    """Where the Hugging Face cache is (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def cached_folder(repo_id: str) -> Path:
    """The folder ``repo_id`` takes in the cache (``models--OWNER--NAME``)."""
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def snapshot(name: str, repo_id: str, weights: str | Path | None = None, *, needs: tuple[str, ...] = ("config.json",)) -> Path:
    """The folder that holds ``repo_id``'s files: ``weights`` when given, else its snapshot in the Hugging Face
    cache, read offline. Raises ``ModelNotFound`` naming the repository, the folder looked in and the fetch
    command."""
    fix = (f"On a machine with internet run `atomkit fetch {name}` (it downloads {repo_id} into {hub_cache()}), "
           f"or pass --weights DIR with a folder that holds its files ({', '.join(needs)}, *.safetensors)")
    if weights is not None:
        folder = Path(weights).expanduser()
        missing = [f for f in needs if not (folder / f).is_file()] + ([] if any(folder.glob("*.safetensors")) else
                                                                      ["*.safetensors"])
        if not folder.is_dir() or missing:
            raise ModelNotFound(name, f"{repo_id} in {folder} ({', '.join(missing) or 'the folder'} missing)", fix)
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=hub_cache(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise ModelNotFound(name, f"{repo_id} in the Hugging Face cache ({cached_folder(repo_id)})", fix) from e
    missing = [f for f in needs if not (folder / f).is_file()] + ([] if any(folder.glob("*.safetensors")) else
                                                                  ["*.safetensors"])
    if missing:
        raise ModelNotFound(name, f"{repo_id} in {folder} ({', '.join(missing)} missing: an interrupted download?)", fix)
    return folder


def fetch(repo_id: str, *, allow_patterns: list[str] | None = None) -> Path:
    """Download ``repo_id`` into the Hugging Face cache (resuming a partial download); the snapshot's folder.
    Offline, or with the hub out of reach, raises ``FetchError`` that says so plainly."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise FetchError(f"HF_HUB_OFFLINE is set in your environment: unset it to download {repo_id} "
                         f"(`env -u HF_HUB_OFFLINE atomkit fetch ...`)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    constants.HF_HUB_OFFLINE = False  # the command line reads everything else offline; fetch alone goes online
    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache(), allow_patterns=allow_patterns, etag_timeout=15))
    except RepositoryNotFoundError as e:
        raise FetchError(f"the hub has no repository {repo_id} (or it needs a login: `huggingface-cli login`)") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        reason = " ".join(str(e).split())[:200]
        raise FetchError(f"cannot download {repo_id}: huggingface.co is not reachable from this machine ({reason}). "
                         f"Fetch it where there is internet and copy {cached_folder(repo_id)} into {hub_cache()} "
                         f"here, or pass --weights DIR to the commands") from e
