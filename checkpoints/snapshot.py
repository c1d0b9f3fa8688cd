"""Hub snapshots of checkpoint folders: download (or read from the Hub cache) a repository at a revision.

A Hub repository holding a dmlkd model is a checkpoint folder (``config.json``, ``model.safetensors``, optional
``<name>.safetensors``) plus a ``README.md`` model card; only those files are fetched (``allow_patterns``) and the
snapshot folder is named by the resolved commit sha. Pull and push are ``dmlkd.checkpoints.hub``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dmlkd.checkpoints.folder import CONFIG_FILE, MODEL_FILE
from dmlkd.errors import CheckpointError
from dmlkd.hub_access import HUB_SCHEME, HubRef, download_error, parse_hub_ref
from dmlkd.version import __version__

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
ALLOW_PATTERNS = (CONFIG_FILE, "*.safetensors", CARD_FILE)


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
        translated = download_error(hub_ref, error, endpoint)
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
