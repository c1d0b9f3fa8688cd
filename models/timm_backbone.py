"""timm models as dmlkd backbones (the optional ``timm`` extra, timm >= 1.0).

A ``TimmBackbone`` wraps ``timm.create_model(NAME, num_classes=0)``. Its pooled feature is the model's own
head pooling without the classifier (``forward_head(forward_features(x), pre_logits=True)``: the CLS token
for ViTs whose convention it is, average pooling (+ ``conv_head`` for MobileNetV3) for CNNs); the dmlkd
embedding head sits on top of it (or nothing, for ``DIM`` 0). Feature maps for FitNet / attention transfer come
from ``forward_intermediates``: for CNNs the last map at each stride 4, 8, 16, 32 that the model's
``feature_info`` lists; ViT-like models give token maps (every block at the patch stride), which the feature
methods refuse with a one-line error (see ``dmlkd.transfer.taps.check_tap_fit``).

Pretrained weights come from the model's Hugging Face Hub repository (``pretrained_cfg.hf_hub_id``, e.g.
``timm/vit_small_patch14_dinov2.lvd142m``) at an optional revision, as ``model.safetensors`` only (never a
pickle), through ``huggingface_hub.hf_hub_download``: with ``HF_HUB_OFFLINE=1`` they are read from the local
Hub cache. Failures are one-line ``CheckpointError``s. Preprocessing (mean, std, input size, interpolation,
crop fraction) comes from the pretrained config and is recorded in the model config.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmlkd.errors import CheckpointError, ConfigError, ModelSpecError, choices
from dmlkd.hub_access import HubRef, download_error, one_line
from dmlkd.models.backbones import Backbone
from dmlkd.models.spec import TIMM_PREFIX, Preprocessing, split_timm_arch
from dmlkd.paths import sha256_file

logger = logging.getLogger(__name__)

MIN_TIMM_VERSION = (1, 0)
WEIGHTS_FILE = "model.safetensors"
TAP_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
TOKEN_TAPS = 4  # ViT-like models: the last blocks' token maps


def require_timm() -> Any:
    """Import timm, or a one-line ``ConfigError`` saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "timm models need the timm package (>= 1.0); install it with pip install 'dmlkd[timm]' "
            "(or pip install 'timm>=1.0')"
        ) from None
    version = tuple(int(part) for part in timm.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TIMM_VERSION:
        raise ConfigError(f"timm {timm.__version__} is too old; dmlkd needs timm >= 1.0 (pip install -U timm)")
    return timm


def timm_version() -> str:
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - timm imported from a source tree
        return str(require_timm().__version__)


def check_timm_name(name: str) -> None:
    """A ``ModelSpecError`` unless timm knows ``name`` (close matches are suggested)."""
    timm = require_timm()
    if timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}" if close else "; see timm.list_models()"
    raise ModelSpecError(f"timm has no model {name!r} (timm {timm.__version__}){hint}")


def pretrained_config(arch: str) -> Any:
    """The timm ``PretrainedCfg`` of ``timm/NAME[.TAG]`` (the default tag when none is given)."""
    name, tag = split_timm_arch(arch)
    check_timm_name(name)
    timm = require_timm()
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(f"{name}.{tag}" if tag else name, allow_unregistered=True)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None and not tag:  # an architecture without any pretrained config: timm's defaults
        from timm.models import PretrainedCfg

        return PretrainedCfg()
    if cfg is None or (tag and cfg.tag != tag):
        tags = sorted(item.partition(".")[2] for item in timm.list_pretrained(f"{name}.*"))
        raise ModelSpecError(
            f"timm model {name!r} has no pretrained tag {tag!r}; choose from: {choices(tags) or '(none)'}"
        )
    return cfg


def hub_id_of(cfg: Any) -> str | None:
    return cfg.hf_hub_id or None


def timm_preprocessing(arch: str) -> Preprocessing:
    """Mean, std, input size, interpolation and crop fraction from the model's pretrained config."""
    return _preprocessing_of(pretrained_config(arch))


def _preprocessing_of(cfg: Any) -> Preprocessing:
    return Preprocessing(
        mean=tuple(float(v) for v in cfg.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.std),  # type: ignore[arg-type]
        color_order="RGB",
        value_range=1.0,
        input_size=int(cfg.input_size[-1]),
        interpolation=str(cfg.interpolation),
        crop_pct=float(cfg.crop_pct),
    )


def resolve_arch(arch: str, pretrained: bool) -> str:
    """``timm/NAME`` -> ``timm/NAME.<default tag>`` when weights are loaded, so the record names the tag."""
    name, tag = split_timm_arch(arch)
    if tag or not pretrained:
        return arch
    cfg = pretrained_config(arch)
    return f"{TIMM_PREFIX}{name}.{cfg.tag}" if cfg.tag else arch


def _accepts(name: str, keyword: str) -> bool:
    """Whether timm's model class behind ``name`` takes ``keyword`` (checked on the meta device: no memory)."""
    timm = require_timm()
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, num_classes=0, **{keyword: True})
    except TypeError as error:
        if keyword in str(error):
            return False
        raise
    return True


def default_timm_kwargs(arch: str, given: dict[str, Any]) -> dict[str, Any]:
    """The ``create_model`` arguments used: ``given`` plus ``dynamic_img_size=True`` for models that take it.

    A dynamic image size lets a ViT teacher see the same batch as the student at any resolution (position
    embeddings are interpolated); it is recorded in the model config so a checkpoint rebuilds identically.
    """
    name, _tag = split_timm_arch(arch)
    kwargs = dict(given)
    if "dynamic_img_size" not in kwargs and _accepts(name, "dynamic_img_size"):
        kwargs["dynamic_img_size"] = True
    return kwargs


def download_weights(repo_id: str, revision: str | None) -> Path:
    """``model.safetensors`` of Hub repository ``repo_id`` (from the local cache when offline)."""
    from huggingface_hub import errors, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, WEIGHTS_FILE, revision=revision))
    except errors.EntryNotFoundError as error:
        if isinstance(error, errors.LocalEntryNotFoundError):
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise CheckpointError(
                    f"pretrained weights {repo_id}{'@' + revision if revision else ''} ({WEIGHTS_FILE}) are not in "
                    "the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading; fetch them once on a "
                    "machine with network access (unset HF_HUB_OFFLINE), or pass a local .safetensors file "
                    "(model.weights_path)"
                ) from None
            translated = download_error(HubRef(repo_id, revision), error, None)
            raise (translated or CheckpointError(one_line(error))) from None
        raise CheckpointError(
            f"Hub repository {repo_id} (revision {revision or 'main'}) has no {WEIGHTS_FILE}; dmlkd loads "
            "safetensors weights only (never pickled .bin/.pth files from the network)"
        ) from None
    except Exception as error:
        translated = download_error(HubRef(repo_id, revision), error, None)
        if translated is None:
            raise CheckpointError(f"cannot fetch {WEIGHTS_FILE} of {repo_id}: {one_line(error)}") from None
        raise translated from None


def _read_safetensors(path: Path, source: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{source}: {str(path)!r} is not a .safetensors file; dmlkd reads timm weights as safetensors only"
        )
    if not path.is_file():
        raise CheckpointError(f"{source}: weights file {str(path)!r} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # SafetensorError, OSError
        raise CheckpointError(f"cannot read {source} {str(path)!r}: {one_line(error)}") from None


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a Hub cache file ``.../snapshots/<commit>/model.safetensors``."""
    parent = path.parent
    return parent.name if parent.parent.name == "snapshots" else None


def _patch_size(model: nn.Module) -> int | None:
    """The patch size of a ViT-like model whose input must be a multiple of it (None: any size works)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "dynamic_img_pad", False):
        return None
    size = getattr(patch_embed, "patch_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size) if size and int(size) > 1 else None


class TimmBackbone(Backbone):
    """A timm model without its classifier; pools as timm does and taps feature maps for feature methods.

    Args:
        arch: ``timm/NAME[.TAG]``.
        pretrained: False (random init), True (the tag's weights from the Hub) or a local ``.safetensors`` path.
        revision: Hub revision of the weights repository (branch, tag or commit); None is ``main``.
        timm_kwargs: extra ``timm.create_model`` arguments.
        bn_momentum: BatchNorm momentum to set (None keeps timm's).

    Attributes:
        tap_channels, tap_strides: channels and strides of the maps ``with_features`` returns.
        tap_kind: ``conv`` (CNN feature maps) or ``tokens`` (ViT patch tokens laid out as maps).
        pooled_dim: width of the pooled feature (timm's pre-logits width).
        preprocessing: what the pretrained config asks for.
        weights: where the weights came from (``repo_id``, ``revision``, ``commit``, ``sha256``), or None.
    """

    def __init__(
        self,
        arch: str,
        pretrained: bool | str = False,
        revision: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        timm = require_timm()
        self.arch = arch
        self.timm_name, self.pretrained_tag = split_timm_arch(arch)
        self.cfg = pretrained_config(arch)
        self.timm_kwargs = dict(timm_kwargs or {})
        self.weights: dict[str, Any] | None = None
        state = self._weights(pretrained, revision) if pretrained is not False else None
        overlay = {"state_dict": state} if state is not None else None
        try:
            self.model = timm.create_model(
                f"{self.timm_name}.{self.pretrained_tag}" if self.pretrained_tag else self.timm_name,
                pretrained=state is not None,
                pretrained_cfg_overlay=overlay,
                num_classes=0,
                **self.timm_kwargs,
            )
        except TypeError as error:
            raise ConfigError(
                f"model.timm_kwargs {self.timm_kwargs!r} do not fit timm model {self.timm_name!r}: {one_line(error)}"
            ) from None
        except RuntimeError as error:  # timm's strict load of the pretrained state dict
            raise CheckpointError(f"pretrained weights of {arch} do not fit the model: {one_line(error)}") from None
        self.preprocessing = _preprocessing_of(self.cfg)
        self.pooled_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.patch_size = _patch_size(self.model)
        self._select_taps()
        if bn_momentum is not None:
            self.set_bn_momentum(bn_momentum)

    def _weights(self, pretrained: bool | str, revision: str | None) -> dict[str, Tensor]:
        if pretrained is True:
            repo_id = hub_id_of(self.cfg)
            if repo_id is None:
                raise CheckpointError(
                    f"{self.arch} has no Hugging Face Hub weights in timm {timm_version()}; "
                    "dmlkd loads timm weights from the Hub as safetensors: pick a tag with Hub weights or pass "
                    "a local .safetensors file (model.weights_path)"
                )
            path = download_weights(repo_id, revision)
            self.weights = {
                "repo_id": repo_id,
                "revision": revision,
                "commit": _snapshot_commit(path),
                "sha256": sha256_file(path),
            }
            return _read_safetensors(path, f"pretrained weights of {self.arch}")
        path = Path(pretrained)
        self.weights = {"file": str(path), "sha256": sha256_file(path) if path.is_file() else None}
        return _read_safetensors(path, "weights file")

    def _select_taps(self) -> None:
        info = list(self.model.feature_info)
        reductions = [int(item["reduction"]) for item in info]
        if hasattr(self.model, "patch_embed") and len(set(reductions)) == 1:
            self.tap_kind = "tokens"
            indices = list(range(len(info)))[-TOKEN_TAPS:]
        else:
            self.tap_kind = "conv"
            last = {reduction: index for index, reduction in enumerate(reductions)}
            indices = [last[stride] for stride in TAP_STRIDES if stride in last]
        self.tap_indices = indices
        self.tap_channels = tuple(int(info[i]["num_chs"]) for i in indices)
        self.tap_strides = tuple(int(info[i]["reduction"]) for i in indices)

    @property
    def out_channels(self) -> int:
        return self.pooled_dim

    def pooled_and_taps(self, x: Tensor, with_features: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """``(pooled (B, pooled_dim), tapped maps or None)`` for preprocessed images ``x``."""
        if self.patch_size and (x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size):
            raise ConfigError(
                f"{self.arch} cuts images into {self.patch_size}-pixel patches, so it needs sizes divisible by "
                f"{self.patch_size}, got {x.shape[-2]}x{x.shape[-1]}; choose an image size such as "
                f"{self.patch_size * 16} (train.image_size / eval.image_size / --image-size)"
            )
        if not with_features:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True), None
        final, maps = self.model.forward_intermediates(x, indices=self.tap_indices, output_fmt="NCHW")
        return self.model.forward_head(final, pre_logits=True), list(maps)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.pooled_and_taps(x, with_features=True)[1] or []

    def timm_record(self) -> dict[str, Any]:
        """What a checkpoint records about this backbone: timm name, tag, version, weights source."""
        return {
            "name": self.timm_name,
            "pretrained_tag": self.pretrained_tag or self.cfg.tag,
            "hf_hub_id": hub_id_of(self.cfg),
            "timm_version": timm_version(),
            "timm_kwargs": dict(self.timm_kwargs),
            "weights": self.weights,
        }


def build_timm_backbone(config: Any) -> tuple[TimmBackbone, Any]:
    """The backbone of a timm ``ModelConfig`` and the config as built: tag, kwargs and preprocessing filled in.

    The returned config is what a checkpoint records, so loading it rebuilds the same network with
    ``pretrained=False`` (no network) before the recorded weights are loaded strictly.
    """
    import dataclasses

    source = config.weights_source()
    pretrained_config(config.arch)  # unknown model or tag: one line, before anything is built
    arch = resolve_arch(config.arch, source is True)
    kwargs = default_timm_kwargs(arch, config.timm_kwargs)
    backbone = TimmBackbone(arch, source, config.revision, kwargs, config.bn_momentum)
    built = dataclasses.replace(
        config,
        arch=arch,
        timm_kwargs=kwargs,
        preprocessing=config.preprocessing if config.preprocessing is not None else backbone.preprocessing,
    )
    return backbone, built
