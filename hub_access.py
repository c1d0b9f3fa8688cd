"""References to Hugging Face Hub repositories and one-line errors for failed downloads.

Torch-free, and ``huggingface_hub`` is only imported when an error is translated, so both the timm backbones
(pretrained weights) and the checkpoint layer (snapshots, pull, push) can use it. References are ``ORG/NAME``,
``ORG/NAME@REVISION`` or ``hf://ORG/NAME[@REVISION]``; REVISION is a branch, a tag or a commit sha.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmlkd.errors import CheckpointError

HUB_SCHEME = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubRef:
    """A Hub repository id and an optional revision (branch, tag or commit sha; None means ``main``)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


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


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def hub_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return endpoint or constants.ENDPOINT


def is_offline(error: BaseException) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    cause = error.__cause__ or error.__context__
    return bool(constants.HF_HUB_OFFLINE) or isinstance(cause, OfflineModeIsEnabled)


def download_error(ref: HubRef, error: Exception, endpoint: str | None) -> CheckpointError | None:
    """Translate a ``huggingface_hub`` / transport exception into one line naming the repository."""
    import httpx2
    from huggingface_hub import errors

    name, where = str(ref), hub_endpoint(endpoint)
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
    if isinstance(error, errors.LocalEntryNotFoundError) and is_offline(error):
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
        return CheckpointError(f"Hub request for {name} failed: {one_line(error)}")
    if isinstance(error, errors.HFValidationError):
        return CheckpointError(f"invalid Hub reference {name!r}: {one_line(error)}")
    if isinstance(error, ValueError):  # huggingface_hub refuses unsafe file names listed by the repository
        return CheckpointError(
            f"Hub repository {name} lists a file name dmlkd will not write ({one_line(error)}); only "
            f"config.json, NAME.safetensors and README.md at the top of the repository are read: check the "
            "repository or revision"
        )
    return None
