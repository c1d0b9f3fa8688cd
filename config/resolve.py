"""Config values decided from the dataset and the model's start: dataset augmentation defaults, the
from-scratch BN-freeze / warm-up rule. This module is torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dmlkd.config.trees import has_key

# What a dataset does not set itself: RandomResizedCrop's scale and ratio, flips, resize 256 -> crop 224.
STANDARD_AUGMENTATION = {
    "image_size": 224,
    "crop_scale": [0.08, 1.0],
    "crop_ratio": [3 / 4, 4 / 3],
    "flip_p": 0.5,
    "eval_resize_ratio": 256 / 224,
}


def resolve_dataset_defaults(tree: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the augmentation fields left ``None`` with the dataset's values, so ``run_config.json`` shows them.

    ``defaults`` is the reader's ``DatasetSplits.defaults`` (e.g. the glyph demo's 32 px, no flips).
    """
    values = {**STANDARD_AUGMENTATION, **{k: v for k, v in defaults.items() if v is not None}}
    result = json.loads(json.dumps(tree))
    train, evaluation = result.setdefault("train", {}), result.setdefault("eval", {})
    for key in ("image_size", "crop_scale", "crop_ratio", "flip_p"):
        if train.get(key) is None:
            train[key] = list(values[key]) if isinstance(values[key], list | tuple) else values[key]
    if evaluation.get("image_size") is None:  # evaluate at the size the model trains at
        evaluation["image_size"] = train["image_size"]
    if evaluation.get("resize_ratio") is None:
        evaluation["resize_ratio"] = float(values["eval_resize_ratio"])
    if train.get("flip_p") is not None:
        train["flip_p"] = float(train["flip_p"])
    return result


def resolve_from_scratch(
    tree: dict[str, Any], given: Mapping[str, Any], model_section: str
) -> tuple[dict[str, Any], list[str]]:
    """A recipe's BN-freeze and warm-up do not apply to a randomly initialised backbone; returns the notes.

    BN-freeze keeps the BatchNorm running statistics of the initial network: for random weights those are
    meaningless, and training collapses (measured on a 400-class folder dataset: R@1 8.1 -> 0.7 in 5 epochs).
    Without ImageNet weights, ``--init`` or ``weights_path``, a BN-freeze or warm-up that came from a recipe is
    turned off (and the note says so); a BN-freeze asked for explicitly is kept (equivalence tests freeze BN
    on purpose) with a warning note.
    """
    model = tree.get(model_section, {})
    from_scratch = not model.get("pretrained", False) and not model.get("weights_path") and not tree.get("init")
    notes: list[str] = []
    if not from_scratch:
        return tree, notes
    optim = tree.setdefault("optim", {})
    if optim.get("bn_freeze"):
        if has_key(given, "optim.bn_freeze"):
            notes.append(
                "warning: optim.bn_freeze=true freezes the BatchNorm statistics of a randomly initialised backbone "
                f"({model_section}.pretrained=false), which usually makes training collapse; kept because it was "
                "asked for (set optim.bn_freeze=false, or start from ImageNet weights with --pretrained)"
            )
        else:
            optim["bn_freeze"] = False
            notes.append("optim.bn_freeze: the recipe's true was turned off (the backbone starts from random weights)")
    if optim.get("warmup_epochs", 0) and not has_key(given, "optim.warmup_epochs"):
        notes.append(
            f"optim.warmup_epochs: the recipe's {optim['warmup_epochs']} was set to 0 (warm-up trains the head on a "
            "frozen backbone, which is meant for pretrained weights)"
        )
        optim["warmup_epochs"] = 0
    return tree, notes
