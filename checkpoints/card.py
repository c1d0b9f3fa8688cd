"""The model card (``README.md``) written next to a checkpoint pushed to the Hugging Face Hub.

Built from the checkpoint's validated ``config.json`` record and, if present, its run's ``run.json``: YAML
front matter for the Hub, metrics in %, provenance with file digests, the training config and a usage snippet.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PERCENT_METRICS = re.compile(r"^(recall@\d+|map@r|nmi)$")


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for name, value in metrics.items():
        if _PERCENT_METRICS.match(name) and isinstance(value, (int, float)):
            label = name.replace("recall@", "Recall@").replace("map@r", "MAP@R").replace("nmi", "NMI")
            rows.append(f"| {label} | {100 * value:.2f} |")
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, list) and len(value) > 5:
        text = f"{len(value)} items"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _describe(record: dict[str, Any], stage: str) -> str:
    model = record.get("model", {})
    spec = f"{model.get('arch', '?')}-{model.get('embedding_dim', '?')}"
    role = {"teacher": "teacher (source) model", "transfer": "student model distilled from a teacher"}
    method = record.get("provenance", {}).get("method")
    text = f"A `{spec}` image embedding {role.get(stage, 'model')}"
    return text + (f" (transfer method `{method}`)" if method and stage == "transfer" else "") + "."


def model_card(record: dict[str, Any], repo_id: str, run: dict[str, Any] | None = None) -> str:
    """The ``README.md`` of a pushed checkpoint: YAML front matter, metrics, provenance, config and usage.

    Args:
        record: the checkpoint's validated ``config.json`` (model, files, train_config, metrics, provenance).
        repo_id: ``ORG/NAME`` the card is written for (used in the usage snippet).
        run: the run folder's ``run.json`` if the checkpoint came from a run (stage, status, command).
    """
    train_config = record.get("train_config") or {}
    provenance = dict(record.get("provenance") or {})
    metrics = record.get("metrics") or {}
    stage = str(train_config.get("stage") or (run or {}).get("stage") or "model")
    dataset = provenance.get("dataset") or (train_config.get("data") or {}).get("name")
    tags = ["dmlkd", "deep-metric-learning", "image-retrieval", "embeddings", str(record["model"]["arch"])]
    if stage == "transfer":
        tags.append("knowledge-distillation")
    front = ["---", "library_name: dmlkd", "pipeline_tag: image-feature-extraction", "tags:"]
    front += [f"- {json.dumps(tag)}" for tag in tags]
    if dataset:
        front += ["datasets:", f"- {json.dumps(str(dataset))}"]
    front += ["metrics:", "- recall", "---", ""]
    lines = [f"# {repo_id}", "", _describe(record, stage), ""]
    lines += [
        "Input: RGB images in [0, 1], shape (B, 3, H, W); the model applies its own preprocessing "
        f"({json.dumps(record['model'].get('preprocessing'))} — null means the architecture default). "
        f"Output: a {record['model'].get('embedding_dim')}-d embedding"
        f"{' (L2-normalised)' if record['model'].get('l2_norm') else ''}.",
        "",
    ]
    rows = _metric_rows(metrics)
    lines += ["## Metrics", ""]
    if rows:
        where = f" on the {dataset} test split" if dataset else ""
        extra = ", ".join(f"{key} {metrics[key]}" for key in ("selected", "epoch", "step") if key in metrics)
        origin = f"Reported by {metrics['reported_by']}" if metrics.get("reported_by") else "Measured by dmlkd"
        lines += [
            f"{origin}{where}" + (f" ({extra})" if extra else "") + ", in %:",
            "",
            "| metric | value |",
            "| --- | --- |",
            *rows,
            "",
        ]
    else:
        lines += ["No evaluation metrics were recorded with this checkpoint.", ""]
    lines += ["## Provenance", "", "| field | value |", "| --- | --- |", f"| stage | {_cell(stage)} |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in sorted(provenance.items())]
    lines += [f"| {name} sha256 | {digest} |" for name, digest in sorted(record.get("files", {}).items())]
    lines += [f"| dmlkd version | {record.get('dmlkd_version', '?')} |", ""]
    if train_config:
        lines += [
            "<details><summary>Training config</summary>",
            "",
            "```json",
            json.dumps(train_config, indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += [
        "## Usage",
        "",
        "```python",
        "import dmlkd",
        "",
        f'model = dmlkd.load("hf://{repo_id}")  # pin a revision: "hf://{repo_id}@<commit sha>"',
        "out = model(images)  # images: (B, 3, H, W) RGB in [0, 1]",
        "embeddings = out.embedding  # (B, D)",
        "```",
        "",
        f"Or on the command line: `dmlkd hub pull {repo_id} --out checkpoints/{repo_id.split('/')[1]}`.",
        "",
    ]
    return "\n".join(front + lines)
