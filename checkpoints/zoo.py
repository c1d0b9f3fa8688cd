"""The model zoo: (dataset, model spec) -> Hub repository + pinned commit + recorded metrics.

The zoo lists only repositories that really exist. dmlkd has published none yet, so the built-in table
(``BUILTIN_ENTRIES``) is empty. Users add their own entries in a JSON file named by the environment variable
``DMLKD_ZOO`` or at ``<user config folder>/dmlkd/zoo.json`` (``$XDG_CONFIG_HOME`` or ``~/.config``)::

    {"entries": [
        {"dataset": "cub", "model": "resnet50-512", "repo_id": "my-org/cub-resnet50-512",
         "revision": "<40-hex commit sha>", "role": "teacher",
         "metrics": {"recall@1": 0.699}, "notes": "converted from the Proxy-Anchor release"}
    ]}

Entries are validated strictly: unknown fields, a malformed spec, repository id or revision, and duplicate
(dataset, model, role) rows are a one-line ``ConfigError`` naming the file and the entry. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dmlkd.errors import ConfigError, DmlkdError, choices
from dmlkd.models.spec import parse_spec

ZOO_ENV = "DMLKD_ZOO"
ROLES = ("teacher", "student")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_DATASET = re.compile(r"^[a-z][a-z0-9_]*$")
_REQUIRED = ("dataset", "model", "repo_id", "revision")
_OPTIONAL = ("role", "method", "metrics", "notes")


@dataclass(frozen=True)
class ZooEntry:
    """One published checkpoint.

    Attributes:
        dataset: dataset name as dmlkd spells it (``cub``, ``cars``, ``sop``, ...).
        model: model spec ``ARCH-DIM`` (normalised, e.g. ``resnet50-512``).
        repo_id: Hub repository ``ORG/NAME``.
        revision: the pinned 40-hex commit sha.
        role: ``teacher`` or ``student``.
        method: transfer method of a student (None for teachers).
        metrics: recorded metrics, fractions in [0, 1] (``recall@1``, ``map@r`` ...).
        notes: free text.
        source: where the entry came from (``built-in`` or the JSON file).
    """

    dataset: str
    model: str
    repo_id: str
    revision: str
    role: str = "teacher"
    method: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    notes: str = ""
    source: str = "built-in"

    @property
    def reference(self) -> str:
        """The pinned reference to load it with: ``hf://ORG/NAME@<commit>``."""
        return f"hf://{self.repo_id}@{self.revision}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reference": self.reference}


# Only repositories that really exist belong here; dmlkd has published none, so this stays empty.
BUILTIN_ENTRIES: tuple[ZooEntry, ...] = ()


@dataclass(frozen=True)
class HubTeacher:
    """A published timm model that can serve as a frozen, head-less teacher as is (``--teacher NAME``).

    Listed by name only: no revision is pinned, because none could be verified here (pin one yourself with
    ``timm/NAME.TAG@<commit>``). ``pooled_dim`` is the width of timm's pooled pre-logits feature.
    """

    name: str
    pooled_dim: int
    notes: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Names as timm >= 1.0 registers them, each with Hub weights at ``hf_hub_id == name`` minus the ``timm/`` prefix
# under the timm organisation (checked against the installed timm's registry by the tests, not downloaded).
HUB_TEACHERS: tuple[HubTeacher, ...] = (
    HubTeacher("timm/vit_small_patch14_dinov2.lvd142m", 384, "DINOv2 ViT-S/14, CLS token; trained at 518 px"),
    HubTeacher("timm/vit_base_patch14_dinov2.lvd142m", 768, "DINOv2 ViT-B/14, CLS token; trained at 518 px"),
    HubTeacher("timm/vit_small_patch14_reg4_dinov2.lvd142m", 384, "DINOv2 ViT-S/14 with 4 registers"),
    HubTeacher("timm/vit_base_patch16_clip_224.openai", 768, "CLIP ViT-B/16 image tower, before the projection"),
    HubTeacher("timm/vit_base_patch16_siglip_224.webli", 768, "SigLIP ViT-B/16 image tower, attention pooling"),
    HubTeacher("timm/eva02_base_patch14_224.mim_in22k", 768, "EVA-02 B/14 (MIM on ImageNet-22k), mean pooling"),
    HubTeacher("timm/convnext_base.fb_in22k", 1024, "ConvNeXt-B (ImageNet-22k), a CNN: FitNet/attention work"),
)


def user_zoo_file() -> Path:
    """The user's zoo file: ``$DMLKD_ZOO``, else ``$XDG_CONFIG_HOME/dmlkd/zoo.json`` or ``~/.config/...``."""
    named = os.environ.get(ZOO_ENV)
    if named:
        return Path(named).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "dmlkd" / "zoo.json"


def _bad(path: Path, index: int, message: str) -> ConfigError:
    return ConfigError(f"zoo file {str(path)!r}, entry {index}: {message}")


def _text(item: dict[str, Any], key: str, path: Path, index: int) -> str:
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, index, f"{key} must be a non-empty string, got {json.dumps(value)}")
    return value.strip()


def _metrics(value: Any, path: Path, index: int) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
        isinstance(name, str) and isinstance(number, (int, float)) and not isinstance(number, bool)
        for name, number in value.items()
    ):
        raise _bad(path, index, f"metrics must map names to numbers, got {json.dumps(value)}")
    return {name: float(number) for name, number in value.items()}


def parse_entry(item: Any, path: Path, index: int) -> ZooEntry:
    """Validate one JSON entry; ``ConfigError`` names the file, the entry index and the bad field."""
    if not isinstance(item, dict):
        raise _bad(path, index, f"expected an object with {', '.join(_REQUIRED)}, got {json.dumps(item)}")
    unknown = sorted(set(item) - set(_REQUIRED) - set(_OPTIONAL))
    missing = [key for key in _REQUIRED if key not in item]
    if unknown:
        raise _bad(path, index, f"unknown field {unknown[0]!r}; valid fields: {choices(_REQUIRED + _OPTIONAL)}")
    if missing:
        raise _bad(path, index, f"missing field {missing[0]!r} (required: {', '.join(_REQUIRED)})")
    dataset, model = _text(item, "dataset", path, index), _text(item, "model", path, index)
    repo_id, revision = _text(item, "repo_id", path, index), _text(item, "revision", path, index)
    if not _DATASET.match(dataset):
        raise _bad(path, index, f"dataset {dataset!r} must be a lowercase dataset name such as cub")
    try:
        model = str(parse_spec(model))
    except DmlkdError as error:
        raise _bad(path, index, str(error)) from None
    if not _REPO_ID.match(repo_id) or "--" in repo_id:
        raise _bad(path, index, f"repo_id {repo_id!r} is not a Hub repository id ORG/NAME")
    if not _COMMIT.match(revision):
        raise _bad(path, index, f"revision {revision!r} must be a pinned 40-hex commit sha, not a branch or tag")
    role = item.get("role", "teacher")
    if role not in ROLES:
        raise _bad(path, index, f"role {json.dumps(role)} is not valid; choose from: {choices(ROLES)}")
    method = item.get("method")
    if method is not None and (not isinstance(method, str) or not method):
        raise _bad(path, index, f"method must be a non-empty string, got {json.dumps(method)}")
    notes = item.get("notes", "")
    if not isinstance(notes, str):
        raise _bad(path, index, f"notes must be a string, got {json.dumps(notes)}")
    return ZooEntry(
        dataset,
        model,
        repo_id,
        revision,
        role,
        method,
        _metrics(item.get("metrics", {}), path, index),
        notes,
        str(path),
    )


def read_zoo_file(path: str | Path) -> list[ZooEntry]:
    """Entries of one zoo JSON file ``{"entries": [...]}``; a malformed file is a one-line ``ConfigError``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read zoo file {str(path)!r}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"zoo file {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or set(data) != {"entries"} or not isinstance(data["entries"], list):
        raise ConfigError(f'zoo file {str(path)!r} must hold one object {{"entries": [...]}} and nothing else')
    entries = [parse_entry(item, path, index) for index, item in enumerate(data["entries"])]
    _check_unique(entries, path)
    return entries


def _check_unique(entries: list[ZooEntry], path: Path) -> None:
    seen: dict[tuple[str, str, str], int] = {}
    for index, entry in enumerate(entries):
        key = (entry.dataset, entry.model, entry.role)
        if key in seen:
            raise _bad(
                path,
                index,
                f"duplicate {entry.role} for dataset {entry.dataset!r} and model "
                f"{entry.model!r} (also entry {seen[key]})",
            )
        seen[key] = index


def zoo_entries() -> list[ZooEntry]:
    """Built-in entries (none yet) followed by the user's file, if it exists.

    A file named by ``DMLKD_ZOO`` must exist; the default location is optional.
    """
    path = user_zoo_file()
    if not path.exists():
        if os.environ.get(ZOO_ENV):
            raise ConfigError(
                f"{ZOO_ENV}={os.environ[ZOO_ENV]!r} names a file that does not exist; create it or unset the variable"
            )
        return list(BUILTIN_ENTRIES)
    return [*BUILTIN_ENTRIES, *read_zoo_file(path)]


def find_teacher(dataset: str, spec: str) -> ZooEntry | None:
    """The teacher entry for ``dataset`` and model spec (e.g. ``cub``, ``resnet50-512``), or None."""
    wanted = str(parse_spec(spec))
    for entry in zoo_entries():
        if entry.role == "teacher" and entry.dataset == dataset and entry.model == wanted:
            return entry
    return None
