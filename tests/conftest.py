"""Shared test setup: an isolated dmlkd cache, no network, small thread counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    # One glyph cache per test session (rendering is deterministic, so sharing it within the session is safe);
    # subprocesses started by tests inherit these variables.
    if "DMLKD_CACHE" not in os.environ:
        os.environ["DMLKD_CACHE"] = str(tmp_path_factory.mktemp("dmlkd-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    # Tiny models are much slower with two intra-op threads on a busy 2-core machine than with one.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny_glyph_args() -> list[str]:
    """CLI options for a fast teacher run on a 16-class glyph subset."""
    return [
        "--dataset",
        "glyphs",
        "--set",
        "data.options.max_classes=16",
        "--model",
        "resnet18-16",
        "--batch-size",
        "16",
        "--ipc",
        "4",
        "--no-progress",
        "--set",
        "eval.nmi=false",
        "--set",
        "train.eval_at_start=false",
    ]


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
