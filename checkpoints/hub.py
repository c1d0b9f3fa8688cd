"""Hugging Face Hub: pull a checkpoint folder by repository and revision, push one with a model card.

A Hub repository holding a dmlkd model is a checkpoint folder (``config.json``, ``model.safetensors``,
optional ``<name>.safetensors``) plus a ``README.md`` model card. A pull fetches only those files
(``allow_patterns``) through ``huggingface_hub.snapshot_download`` into the Hub cache, resolves the revision
to a commit sha, loads the snapshot strictly (digests and state-dict keys) and only then publishes a copy in
``--out`` (assembled in a temporary sibling folder and renamed), so a failed pull leaves nothing there. No
pickle is read anywhere. Every failure is one ``CheckpointError`` line naming the repository and what to do.

References are ``ORG/NAME``, ``ORG/NAME@REVISION`` or, where a local path is also accepted,
``hf://ORG/NAME[@REVISION]``; REVISION is a branch, a tag or a commit sha.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlkd.checkpoints.card import model_card
from dmlkd.checkpoints.io import (
    CONFIG_FILE,
    MODEL_FILE,
    load_checkpoint,
    read_checkpoint_config,
    verify_files,
    write_folder_atomically,
)
from dmlkd.errors import CheckpointError

logger = logging.getLogger(__name__)

HUB_SCHEME = "hf://"
CARD_FILE = "README.md"
ALLOW_PATTERNS = (CONFIG_FILE, "*.safetensors", CARD_FILE)
RUN_FILE = "run.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubRef:
    """A Hub repository id and an optional revision (branch, tag or commit sha; None means ``main``)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class Snapshot:
    """A downloaded or cached repository snapshot at ``<cache>/models--ORG--NAME/snapshots/<commit>``."""

    repo_id: str
    revision: str
    commit: str
    path: Path

    def provenance(self) -> dict[str, str]:
        """What to record about where the checkpoint came from; ``ref`` pins the commit."""
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "ref": f"{HUB_SCHEME}{self.repo_id}@{self.commit}",
        }


@dataclass(frozen=True)
class PullResult:
    """Where a pulled checkpoint lies (``--out`` or the cache snapshot) and its validated ``config.json``."""

    snapshot: Snapshot
    path: Path
    record: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PushResult:
    """The repository a checkpoint was pushed to, the new commit and the files uploaded."""

    repo_id: str
    commit: str
    url: str
    files: tuple[str, ...]
    source: Path


def is_hub_ref(ref: object) -> bool:
    """True for ``hf://ORG/NAME[@REVISION]`` strings."""
    return isinstance(ref, str) and ref.startswith(HUB_SCHEME)


def parse_hub_ref(text: str) -> HubRef:
    """Parse ``[hf://]ORG/NAME[@REVISION]``; a malformed reference is a one-line ``CheckpointError``."""
    body = text.removeprefix(HUB_SCHEME).strip()
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or (_ and not revision):
        raise CheckpointError(
            f"malformed Hub reference {text!r}; expected ORG/NAME or ORG/NAME@REVISION "
            "(REVISION: a branch, tag or commit sha), e.g. hf://my-org/cub-resnet50-512@main"
        )
    return HubRef(repo_id, revision or None)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return endpoint or constants.ENDPOINT


def _is_offline(error: BaseException) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    cause = error.__cause__ or error.__context__
    return bool(constants.HF_HUB_OFFLINE) or isinstance(cause, OfflineModeIsEnabled)


def _download_error(ref: HubRef, error: Exception, endpoint: str | None) -> CheckpointError | None:
    """Translate a ``huggingface_hub`` / transport exception into one line naming the repository."""
    import httpx2
    from huggingface_hub import errors

    name, where = str(ref), _endpoint(endpoint)
    if isinstance(error, errors.RevisionNotFoundError):
        return CheckpointError(
            f"revision {ref.revision or 'main'!r} does not exist in Hub repository {ref.repo_id} at {where}; "
            f"pass a branch, tag or commit sha of it ({HUB_SCHEME}{ref.repo_id}@REVISION)"
        )
    if isinstance(error, errors.GatedRepoError):
        return CheckpointError(
            f"Hub repository {ref.repo_id} is gated: accept its terms on the Hub, then log "
            "in (`hf auth login` or HF_TOKEN)"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return CheckpointError(
            f"Hub repository {ref.repo_id} was not found at {where} (or it is private and you are not logged "
            "in); check the ORG/NAME spelling, or log in with `hf auth login` / set HF_TOKEN"
        )
    if isinstance(error, errors.LocalEntryNotFoundError) and _is_offline(error):
        return CheckpointError(
            f"{name} is not (completely) in the local Hub cache and HF_HUB_OFFLINE=1 forbids downloading; "
            "unset HF_HUB_OFFLINE on a machine with network access to fetch it, or pass a local checkpoint "
            "folder"
        )
    if isinstance(error, (errors.LocalEntryNotFoundError, httpx2.TransportError, ConnectionError)):
        return CheckpointError(
            f"no network: cannot reach the Hub at {where} to fetch {name}, and it is not in the local cache; "
            "set HF_HUB_OFFLINE=1 to use the local cache, or pass a local checkpoint folder"
        )
    if isinstance(error, errors.HfHubHTTPError):
        return CheckpointError(f"Hub request for {name} failed: {_one_line(error)}")
    if isinstance(error, errors.HFValidationError):
        return CheckpointError(f"invalid Hub reference {name!r}: {_one_line(error)}")
    if isinstance(error, ValueError):  # huggingface_hub refuses unsafe file names listed by the repository
        return CheckpointError(
            f"Hub repository {name} lists a file name dmlkd will not write ({_one_line(error)}); only "
            f"{CONFIG_FILE}, NAME.safetensors and {CARD_FILE} at the top of the repository are read: check the "
            "repository or revision"
        )
    return None


def download_snapshot(
    ref: str | HubRef,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> Snapshot:
    """Fetch ``config.json``, ``*.safetensors`` and ``README.md`` of a Hub repository at a revision.

    Uses the Hub cache (``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` only the cache is read. The returned
    snapshot folder is a checkpoint folder named by the resolved commit sha. Raises ``CheckpointError`` when
    the repository, revision or network is unavailable, or the snapshot holds no ``config.json``.
    """
    from dmlkd import __version__

    hub_ref = parse_hub_ref(ref) if isinstance(ref, str) else ref
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            hub_ref.repo_id,
            revision=hub_ref.revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            token=token,
            allow_patterns=list(ALLOW_PATTERNS),
            library_name="dmlkd",
            library_version=__version__,
        )
    except Exception as error:
        translated = _download_error(hub_ref, error, endpoint)
        if translated is None:
            raise
        raise translated from error
    path = Path(folder)
    snapshot = Snapshot(hub_ref.repo_id, hub_ref.revision or "main", path.name, path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"Hub repository {hub_ref.repo_id} at commit {snapshot.commit} has no {CONFIG_FILE}: it is not a "
            f"dmlkd checkpoint (expected {CONFIG_FILE} + {MODEL_FILE}); check the repository or revision"
        )
    logger.info("%s resolved to commit %s (%s)", hub_ref, snapshot.commit, path)
    return snapshot


def resolve_hub_ref(ref: str) -> Path:
    """The local snapshot folder of ``hf://ORG/NAME[@REVISION]``, downloaded if needed."""
    return download_snapshot(ref).path


def hub_provenance(directory: str | Path) -> dict[str, str] | None:
    """Repository and commit of a checkpoint folder that is a Hub cache snapshot, else None.

    Recognises ``.../models--ORG--NAME/snapshots/<commit>`` (Hub repo ids cannot contain ``--``).
    """
    path = Path(directory)
    repo_folder = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo_folder.startswith("models--"):
        return None
    parts = repo_folder.removeprefix("models--").split("--")
    if len(parts) != 2:
        return None
    repo_id = "/".join(parts)
    return {"repo_id": repo_id, "commit": path.name, "ref": f"{HUB_SCHEME}{repo_id}@{path.name}"}


def load_from_hub(ref: str, device: str = "cpu", **download: Any) -> tuple[Any, dict[str, Any]]:
    """Download and strictly load a Hub checkpoint; the record's ``provenance["hub"]`` holds the commit."""
    snapshot = download_snapshot(ref, **download)
    model, record = _load_verified(snapshot)
    model.to(device)
    return model, record


def _load_verified(snapshot: Snapshot) -> tuple[Any, dict[str, Any]]:
    try:
        model, record = load_checkpoint(snapshot.path)
    except CheckpointError as error:
        raise CheckpointError(f"Hub repository {snapshot.repo_id}@{snapshot.commit}: {error}") from error
    record.setdefault("provenance", {})["hub"] = snapshot.provenance()
    return model, record


def pull(
    ref: str | HubRef,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> PullResult:
    """Download a checkpoint, verify it by loading it strictly, and optionally copy it to ``out``.

    The copy in ``out`` records the repository, asked revision and resolved commit under
    ``provenance.hub`` of its ``config.json``; it is written atomically (a failed pull leaves no ``out``).
    """
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.exists() and not out_path.is_dir():
        raise CheckpointError(f"--out {str(out_path)!r} is a file; pass a folder to create")
    if out_path is not None and out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise CheckpointError(
            f"--out {str(out_path)!r} already exists and is not empty; choose a new folder or pass --overwrite"
        )
    snapshot = download_snapshot(ref, cache_dir=cache_dir, endpoint=endpoint, token=token)
    _model, record = _load_verified(snapshot)
    if out_path is None:
        return PullResult(snapshot, snapshot.path, record)
    names = [CONFIG_FILE, *sorted(name for name in record["files"])]

    def fill(tmp: Path) -> None:
        for name in names[1:]:
            shutil.copyfile(snapshot.path / name, tmp / name)
        if (snapshot.path / CARD_FILE).is_file():
            shutil.copyfile(snapshot.path / CARD_FILE, tmp / CARD_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        verify_files(tmp, read_checkpoint_config(tmp))  # the copies, not only what was loaded

    write_folder_atomically(out_path, fill)
    return PullResult(snapshot, out_path, record)


def resolve_push_source(source: str | Path, which: str = "last") -> Path:
    """The checkpoint folder to push: ``source/<which>`` for a run folder, else ``source`` itself."""
    path = Path(source)
    if which not in ("best", "last"):
        raise CheckpointError(f"--which {which!r} is not valid; choose from: best, last")
    if (path / RUN_FILE).is_file() or (path / "best").is_dir() or (path / "last").is_dir():
        if not (path / which / CONFIG_FILE).is_file():
            other = "last" if which == "best" else "best"
            raise CheckpointError(
                f"run folder {str(path)!r} has no {which}/ checkpoint; pass --which {other} or a checkpoint folder"
            )
        return path / which
    if (path / CONFIG_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; pass a run folder or a checkpoint folder")
    raise CheckpointError(
        f"{str(path)!r} is neither a run folder (with best/ or last/) nor a checkpoint folder "
        f"(with {CONFIG_FILE} + {MODEL_FILE})"
    )


def _read_run(folder: Path) -> dict[str, Any]:
    for candidate in (folder / RUN_FILE, folder.parent / RUN_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                return {}
    return {}


def push(
    source: str | Path,
    repo_id: str,
    *,
    which: str = "last",
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    dry_run_dir: str | Path | None = None,
) -> PushResult:
    """Upload a run's ``last/`` (or ``best/``) checkpoint, or a checkpoint folder, with a model card.

    The checkpoint is loaded strictly first; only ``config.json``, its ``*.safetensors`` files and the
    generated ``README.md`` are uploaded (``create_repo(exist_ok=True)`` + ``upload_folder``). With
    ``dry_run_dir`` nothing is uploaded: exactly those files are written to that new folder (``commit`` and
    ``url`` of the result are empty), so the model card can be read before publishing.
    """
    hub_ref = parse_hub_ref(repo_id)
    if hub_ref.revision:
        raise CheckpointError(f"push target {repo_id!r} must be ORG/NAME without @REVISION; use --branch")
    folder = resolve_push_source(source, which)
    _model, record = load_checkpoint(folder)
    card = model_card(record, hub_ref.repo_id, run=_read_run(folder))
    names = [CONFIG_FILE, *sorted(record["files"]), CARD_FILE]
    if dry_run_dir is not None:
        return _write_preview(Path(dry_run_dir), folder, names, card, hub_ref.repo_id)
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="dmlkd-push-") as staging:
        staged = Path(staging)
        for name in names[:-1]:  # load_checkpoint refused links; never follow one that appeared since
            shutil.copyfile(folder / name, staged / name, follow_symlinks=False)
        verify_files(staged, read_checkpoint_config(staged))  # upload exactly the bytes the digests name
        (staged / CARD_FILE).write_text(card)
        try:
            api = HfApi(endpoint=endpoint, token=token, library_name="dmlkd")
            api.create_repo(hub_ref.repo_id, exist_ok=True, private=private)
            info = api.upload_folder(
                repo_id=hub_ref.repo_id,
                folder_path=staged,
                allow_patterns=list(ALLOW_PATTERNS),
                revision=revision,
                commit_message=commit_message or f"Upload dmlkd checkpoint from {folder.name}",
            )
        except Exception as error:
            raise _push_error(hub_ref.repo_id, error, endpoint) from error
    return PushResult(hub_ref.repo_id, info.oid, str(info.commit_url), tuple(names), folder)


def _write_preview(target: Path, folder: Path, names: list[str], card: str, repo_id: str) -> PushResult:
    from dmlkd.checkpoints.io import write_folder_atomically

    if target.exists() and any(target.iterdir()):
        raise CheckpointError(f"dry-run folder {str(target)!r} already exists and is not empty; choose another --out")

    def fill(staged: Path) -> None:
        for name in names[:-1]:
            shutil.copyfile(folder / name, staged / name)
        (staged / CARD_FILE).write_text(card)

    if target.exists():
        target.rmdir()
    write_folder_atomically(target, fill)
    return PushResult(repo_id, "", "", tuple(names), folder)


def _push_error(repo_id: str, error: Exception, endpoint: str | None) -> Exception:
    import httpx2
    from huggingface_hub import errors

    where = _endpoint(endpoint)
    preview = "`dmlkd hub push --dry-run` writes the upload with its model card to a local folder"
    if isinstance(error, errors.OfflineModeIsEnabled):
        return CheckpointError(
            f"cannot push {repo_id}: HF_HUB_OFFLINE=1 is set, which forbids uploads; unset it (e.g. "
            f"HF_HUB_OFFLINE=0 dmlkd hub push ...) on a machine with network access; {preview}"
        )
    if isinstance(error, (httpx2.TransportError, ConnectionError)):
        return CheckpointError(
            f"no network: cannot reach the Hub at {where} to push {repo_id}; retry when online ({preview})"
        )
    if isinstance(error, (errors.HfHubHTTPError, errors.LocalTokenNotFoundError, errors.HFValidationError)):
        return CheckpointError(
            f"push to Hub repository {repo_id} at {where} failed: {_one_line(error)}; log in with "
            "`hf auth login` or set HF_TOKEN to a token with write access to ORG"
        )
    return error
