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
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlkd.checkpoints.card import model_card
from dmlkd.checkpoints.folder import (
    CONFIG_FILE,
    MODEL_FILE,
    read_checkpoint_config,
    verify_files,
    write_folder_atomically,
)
from dmlkd.checkpoints.io import load_checkpoint
from dmlkd.checkpoints.snapshot import ALLOW_PATTERNS, CARD_FILE, Snapshot, download_snapshot
from dmlkd.errors import CheckpointError
from dmlkd.hub_access import HubRef, hub_endpoint, one_line, parse_hub_ref

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


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

    where = hub_endpoint(endpoint)
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
            f"push to Hub repository {repo_id} at {where} failed: {one_line(error)}; log in with "
            "`hf auth login` or set HF_TOKEN to a token with write access to ORG"
        )
    return error
