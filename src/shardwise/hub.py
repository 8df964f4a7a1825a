"""Models named on the Hugging Face Hub (``--hf-model-name ORG/NAME``), found through the huggingface_hub cache.

:func:`hf_model_path` turns a model name (and an optional revision) into the local snapshot folder
that the huggingface_hub cache keeps for it; the rest of shardwise reads that folder like any HF
folder. The contract:

- the cache is the one huggingface_hub uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``~/.cache/huggingface/hub`` (``models--ORG--NAME/refs/<revision>``, ``snapshots/<commit>/``);
  the environment is read at each call, not when a library was imported;
- with ``HF_HUB_OFFLINE`` set (1, true, yes, on), only the cache is looked at: nothing goes over the
  network, and huggingface_hub need not be installed;
- otherwise the Hub is asked (``huggingface_hub.snapshot_download``) for the top-level files an HF
  folder needs: configs, tokenizer files and safetensors weights, or torch weights when the model
  has no safetensors. They land in the same cache. When the Hub cannot be reached, or refuses,
  the cached snapshot is used if there is one;
- the token is ``HF_TOKEN`` from the environment, or none (never a stored login); nothing prompts;
- a model that is neither cached nor reachable raises :class:`~shardwise.errors.HubError` with
  one line naming the model, the cache and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import HubError

__all__ = ["hf_model_path", "hub_cache_dir", "cached_snapshot"]

# huggingface_hub's own rule for repository ids: "name" or "namespace/name", no "--" or "..".
_REPO_ID = re.compile(r"^(?:[\w][\w.-]{0,95}/)?[\w][\w.-]{0,95}$")
_REVISION = re.compile(r"^[\w][\w./-]{0,255}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "true", "yes", "on"}
_FOLDER_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_TORCH_WEIGHTS = ["*.bin", "*.pt", "*.pth"]
_SUBFOLDERS = ["*/*"]  # other variants (onnx/, original/, ...) are not the model the folder describes


def hub_cache_dir() -> Path:
    """The huggingface_hub cache folder the environment names now (see module docstring)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expanduser(os.path.expandvars(explicit)))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expanduser(os.path.expandvars(home))) / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _check(name: str, revision: str | None) -> None:
    if not _REPO_ID.fullmatch(name) or "--" in name or ".." in name:
        raise HubError(f"--hf-model-name {name!r}: not a Hugging Face model name; write ORG/NAME (letters, digits, '-', '_', '.')")
    if revision is not None and (not _REVISION.fullmatch(revision) or ".." in revision.split("/")):
        raise HubError(f"--revision {revision!r}: not a branch, tag or commit name")


def _describe(name: str, revision: str | None) -> str:
    return f"{name} (revision {revision})" if revision else name


def _download_command(name: str, revision: str | None) -> str:
    return f"hf download {name}" + (f" --revision {revision}" if revision else "")


def cached_snapshot(name: str, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of model ``name`` at ``revision`` (default ``main``), or None.

    A commit hash names ``snapshots/<hash>`` directly; a branch or tag is read from ``refs/``. The
    folder is returned as it is: a snapshot cached in part holds only the files fetched so far.
    """
    repo = (cache_dir or hub_cache_dir()) / ("models--" + name.replace("/", "--"))
    revision = revision or "main"
    commit = revision
    if not _COMMIT.fullmatch(revision):
        try:
            commit = (repo / "refs" / revision).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
    snapshot = repo / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def hf_model_path(name: str, *, revision: str | None = None) -> Path:
    """The local folder of Hub model ``name`` (``ORG/NAME``) at ``revision``, from the cache or downloaded into it.

    See the module docstring for the rules (offline mode, token, what is downloaded). Raises
    HubError when the name is malformed, or the model is neither cached nor reachable.

    >>> shardwise.convert(hf_model_path("org/model"), "nx", to="nxdt", tp=2)  # doctest: +SKIP
    """
    _check(name, revision)
    cache = hub_cache_dir()
    if _offline():
        found = cached_snapshot(name, revision, cache)
        if found is None:
            raise HubError(
                f"{_describe(name, revision)}: not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; "
                f"download it first ({_download_command(name, revision)}), point HF_HOME/HF_HUB_CACHE at a cache that holds it, or pass a local folder"
            )
        return found
    try:
        return _download(name, revision, cache)
    except _hub_errors() as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # what the Hub refused as incomplete is not used either
            raise HubError(f"{_describe(name, revision)}: the snapshot in {cache} is incomplete ({e}); download it again ({_download_command(name, revision)})") from None
        found = cached_snapshot(name, revision, cache)
        if found is not None:
            return found
        raise HubError(f"{_describe(name, revision)}: not in the Hugging Face cache {cache}, and {_why(e, _download_command(name, revision))}") from None
    except OSError as e:  # the disk, not the Hub: no silent fall-back to an older snapshot
        raise HubError(f"{_describe(name, revision)}: downloading into {cache} failed: {e.strerror or e}") from None


def _download(name: str, revision: str | None, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubError(
            f"{name}: not in the Hugging Face cache {cache}; downloading it needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    options = dict(
        revision=revision, cache_dir=str(cache), token=os.environ.get("HF_TOKEN") or False,
        endpoint=os.environ.get("HF_ENDPOINT") or None, ignore_patterns=_SUBFOLDERS,
    )
    folder = Path(snapshot_download(name, allow_patterns=_FOLDER_FILES, **options))
    if not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(name, allow_patterns=_FOLDER_FILES + _TORCH_WEIGHTS, **options))
    return folder


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What snapshot_download raises when the Hub cannot be reached or refuses: its HTTP errors, and
    LocalEntryNotFoundError (unreachable and not cached). Other OSErrors (a full disk) are not Hub errors."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    errors: tuple[type[BaseException], ...] = (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError)
    try:
        import httpx2  # huggingface_hub's HTTP client: proxy errors come through unwrapped

        errors += (httpx2.HTTPError,)
    except ImportError:
        pass
    return errors


def _why(error: BaseException, download: str) -> str:
    """The reason in one line: refused (HF_TOKEN), no such revision, or unreachable."""
    kind = type(error).__name__
    if kind in ("RepositoryNotFoundError", "GatedRepoError") or getattr(getattr(error, "response", None), "status_code", None) in (401, 403):
        return f"the Hub refused it ({kind}): it does not exist, or it is gated or private; set HF_TOKEN to a token that may read it"
    if kind == "RevisionNotFoundError":
        return "the Hub has no such revision"
    cause = error.__cause__ or error
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (
        f"the Hub could not be reached ({type(cause).__name__}: {detail}); download it where the Hub is reachable "
        f"({download}) into this cache, or pass a local folder"
    )
