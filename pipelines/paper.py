"""The published numbers the pipelines are compared against (seed-spec §8), as data.

``TRANSFER_RESULTS`` holds the LR README tables (Kim et al., "Embedding Transfer with Label Relaxation for
Improved Metric Learning", CVPR 2021): scenario × dataset × method → Recall@K in percent. The README headers
say R@1/2/4 for every dataset, but the SOP columns are really R@1/10/100 (79.2/90.7/96.2 is Proxy-Anchor's SOP
R@1/10/100), so each dataset carries its own K values. ``SOURCE_RESULTS`` holds the Proxy-Anchor README table
(Kim et al., CVPR 2020) for the d=512 sources. All of these numbers are **selected on the test split** (best
R@1 epoch), and the LR students are ranked by Euclidean distance on the raw embedding while the sources use
cosine (seed-spec §7).

Method keys are dmlkd's transfer-method names (``dmlkd.registry.TRANSFER_METHODS``) plus ``"source"`` for
the teacher row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PAPER_CITATION = "LR README (Kim et al., CVPR 2021), transfer tables; sources from the Proxy-Anchor README"

SCENARIOS = ("self-transfer", "dim-reduction", "compress")
DATASET_KS: dict[str, tuple[int, ...]] = {"cub": (1, 2, 4), "cars": (1, 2, 4), "sop": (1, 10, 100)}

_SCENARIO_ALIASES = {
    "self": "self-transfer",
    "selftransfer": "self-transfer",
    "self-distillation": "self-transfer",
    "dim": "dim-reduction",
    "dimred": "dim-reduction",
    "dim-reduce": "dim-reduction",
    "dimension-reduction": "dim-reduction",
    "dimensionality-reduction": "dim-reduction",
    "compression": "compress",
    "model-compression": "compress",
}
_METHOD_ALIASES = {"teacher": "source", "relaxed": "relaxed_contrastive", "at": "attention"}


@dataclass(frozen=True)
class PaperResult:
    """One published cell: Recall@K in percent for ``ks``; ``suspect``: the K values that look like typos."""

    ks: tuple[int, ...]
    recall: tuple[float, ...]
    suspect: tuple[int, ...] = ()
    note: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "ks": list(self.ks),
            "recall": {str(k): value for k, value in zip(self.ks, self.recall)},
            "suspect_ks": list(self.suspect),
            "note": self.note,
        }


_CUB_R50_TYPO = "probable typo in the LR README: the Proxy-Anchor README gives CUB ResNet50 R@4 = 86.6, not 88.6"
_SOP_R50_TYPO = (
    "probable typo in the LR README: SOP R@100 = 98.8 is implausibly close to R@1000, and this SOP ResNet50 "
    "source row has no Proxy-Anchor counterpart"
)


def _cells(
    rows: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]],
) -> dict[str, dict[str, PaperResult]]:
    """``{method: (cub, cars, sop)}`` → ``{dataset: {method: PaperResult}}``."""
    table: dict[str, dict[str, PaperResult]] = {"cub": {}, "cars": {}, "sop": {}}
    for method, values in rows.items():
        for dataset, recall in zip(("cub", "cars", "sop"), values):
            table[dataset][method] = PaperResult(DATASET_KS[dataset], recall)
    return table


_BN_SOURCE = ((69.1, 78.9, 86.1), (86.4, 91.9, 95.0), (79.2, 90.7, 96.2))

TRANSFER_RESULTS: dict[str, dict[str, dict[str, PaperResult]]] = {
    "self-transfer": _cells(
        {
            "source": _BN_SOURCE,
            "fitnet": ((69.9, 79.5, 86.2), (87.6, 92.2, 95.6), (78.7, 90.4, 96.1)),
            "attention": ((66.3, 76.2, 84.5), (84.7, 90.6, 94.2), (78.2, 90.4, 96.2)),
            "crd": ((67.7, 78.1, 85.7), (85.3, 91.1, 94.8), (78.1, 90.2, 95.8)),
            "darkrank": ((66.7, 76.5, 84.8), (84.0, 90.0, 93.8), (75.7, 88.3, 95.3)),
            "pkt": ((69.1, 78.8, 86.4), (86.4, 91.6, 94.9), (78.4, 90.2, 96.0)),
            "rkd": ((70.9, 80.8, 87.5), (88.9, 93.5, 96.4), (78.5, 90.2, 96.0)),
            "relaxed_contrastive": ((72.1, 81.3, 87.6), (89.6, 94.0, 96.5), (79.8, 91.1, 96.3)),
        }
    ),
    "dim-reduction": _cells(
        {
            "source": _BN_SOURCE,
            "fitnet": ((62.3, 73.8, 83.0), (81.2, 87.7, 92.5), (76.6, 89.3, 95.4)),
            "attention": ((58.3, 69.4, 79.1), (79.2, 86.7, 91.8), (76.3, 89.2, 95.4)),
            "crd": ((60.9, 72.7, 81.7), (79.2, 87.2, 92.1), (75.5, 88.3, 95.3)),
            "darkrank": ((63.5, 74.3, 83.1), (78.1, 85.9, 91.1), (73.9, 87.5, 94.8)),
            "pkt": ((63.6, 75.8, 84.0), (82.2, 88.7, 93.5), (74.6, 87.3, 94.2)),
            "rkd": ((65.8, 76.7, 85.0), (83.7, 89.9, 94.1), (70.2, 83.8, 92.1)),
            "relaxed_contrastive": ((67.4, 78.0, 85.9), (86.5, 92.3, 95.3), (76.3, 88.6, 94.8)),
        }
    ),
    "compress": _cells(
        {
            "source": ((69.9, 79.6, 88.6), (87.7, 92.7, 95.5), (80.5, 91.8, 98.8)),
            "fitnet": ((61.0, 72.2, 81.1), (78.5, 86.0, 91.4), (76.7, 89.4, 95.5)),
            "attention": ((61.0, 71.7, 81.5), (78.6, 85.9, 91.0), (76.4, 89.3, 95.5)),
            "crd": ((62.8, 73.8, 83.2), (80.6, 87.9, 92.5), (76.2, 88.9, 95.3)),
            "darkrank": ((61.2, 72.5, 82.0), (75.3, 83.6, 89.4), (72.7, 86.7, 94.5)),
            "pkt": ((65.0, 75.6, 84.8), (81.6, 88.8, 93.4), (76.9, 89.2, 95.5)),
            "rkd": ((65.8, 76.3, 84.8), (84.2, 90.4, 94.3), (75.7, 88.4, 95.1)),
            "relaxed_contrastive": ((66.6, 78.1, 85.9), (86.0, 91.6, 95.3), (78.4, 90.4, 96.1)),
        }
    ),
}
# The two probable typos of the LR README (seed-spec §8.2, marked (*) there).
TRANSFER_RESULTS["compress"]["cub"]["source"] = PaperResult((1, 2, 4), (69.9, 79.6, 88.6), (4,), _CUB_R50_TYPO)
TRANSFER_RESULTS["compress"]["sop"]["source"] = PaperResult((1, 10, 100), (80.5, 91.8, 98.8), (100,), _SOP_R50_TYPO)

# Proxy-Anchor README, d=512 sources (seed-spec §8.1): backbone × dataset.
SOURCE_RESULTS: dict[str, dict[str, PaperResult]] = {
    "bn_inception": {
        "cub": PaperResult((1, 2, 4, 8), (69.1, 78.9, 86.1, 91.2)),
        "cars": PaperResult((1, 2, 4, 8), (86.4, 91.9, 95.0, 97.0)),
        "sop": PaperResult((1, 10, 100, 1000), (79.2, 90.7, 96.2, 98.6)),
        "inshop": PaperResult((1, 10, 20, 30, 40), (91.9, 98.1, 98.7, 99.0, 99.1)),
    },
    "resnet50": {
        "cub": PaperResult((1, 2, 4, 8), (69.9, 79.6, 86.6, 91.4)),
        "cars": PaperResult((1, 2, 4, 8), (87.7, 92.7, 95.5, 97.3)),
    },
}


def canonical_scenario(scenario: str) -> str | None:
    """``"self_transfer"``, ``"Self-Transfer"``, ``"compression"`` → a ``TRANSFER_RESULTS`` key, else None."""
    key = scenario.strip().lower().replace("_", "-").replace(" ", "-")
    key = _SCENARIO_ALIASES.get(key, key)
    return key if key in TRANSFER_RESULTS else None


def canonical_method(method: str | None, role: str = "student") -> str | None:
    """The ``TRANSFER_RESULTS`` row of a method name; a teacher is always the ``"source"`` row."""
    if role == "teacher":
        return "source"
    if method is None:
        return None
    key = method.strip().lower().replace("-", "_")
    return _METHOD_ALIASES.get(key, key)


def paper_table(scenario: str, dataset: str) -> dict[str, PaperResult] | None:
    """All published rows for ``scenario`` on ``dataset`` (cub, cars, sop), or None when there are none."""
    key = canonical_scenario(scenario)
    if key is None:
        return None
    return TRANSFER_RESULTS[key].get(dataset.strip().lower())


def paper_result(scenario: str, dataset: str, method: str | None, role: str = "student") -> PaperResult | None:
    """The published cell for one method (``role="teacher"`` → the source row), or None."""
    table = paper_table(scenario, dataset)
    row = canonical_method(method, role)
    if table is None or row is None:
        return None
    return table.get(row)


def _percent(value: object) -> str:
    return f"{100 * value:.1f}" if isinstance(value, int | float) and value == value else "–"


def comparison_rows(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of "ours vs the paper" for the report entries that have a published cell.

    ``entries`` are the report's per-model results (``name``, ``method``, ``paper`` with its ``row``, and
    ``best``/``last`` metrics as fractions); the paper's numbers are in percent, ``*`` marks a likely typo.
    """
    header = ["run", "paper row", "R@K", "paper", "ours best (test)", "ours last"]
    rows = []
    for entry in entries:
        cell = entry.get("paper")
        if not cell:
            continue
        suspect = {int(k) for k in cell["suspect_ks"]}
        paper = " / ".join(f"{v:.1f}{'*' if int(k) in suspect else ''}" for k, v in cell["recall"].items())
        ours = [
            " / ".join(_percent((entry.get(side) or {}).get(f"recall@{k}")) for k in cell["ks"])
            for side in ("best", "last")
        ]
        name, method = entry["name"], entry.get("method")
        row = [
            f"{name} ({method})" if method and method not in name else name,
            cell.get("row") or "–",
            "/".join(map(str, cell["ks"])),
        ]
        rows.append([*row, paper, *ours])
    return header, rows
