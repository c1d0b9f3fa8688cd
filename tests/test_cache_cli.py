"""``dmlkd cache ls`` / ``dmlkd cache clean``: listing and removing teacher-output caches."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from dmlkd.cli import main
from dmlkd.transfer.cache.storage import FORMAT_NAME


def _cache(folder: Path, name: str, images: int, age_days: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"teacher-{name}.safetensors"
    metadata = {"format": FORMAT_NAME, "spec": json.dumps({"mode": "cached"}), "teacher_digest": "ab" * 32}
    save_file({"embeddings": torch.zeros(images, 2, 4, dtype=torch.float16)}, str(path), metadata=metadata)
    stamp = time.time() - age_days * 86400
    os.utime(path, (stamp, stamp))
    return path


def _run(*args: str):
    return CliRunner().invoke(main, ["cache", *args])


def test_cache_ls_and_clean(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DMLKD_CACHE", str(tmp_path / "home"))
    folder = tmp_path / "home" / "teacher-outputs"
    old, new = _cache(folder, "0123456789abcdef", 10, 40), _cache(folder, "fedcba9876543210", 3, 1)
    leftover = folder / ".teacher-0000.safetensors.x1.tmp"
    leftover.write_bytes(b"half")
    listed = json.loads(_run("ls", "--json").stdout)
    assert listed["folder"] == str(folder)
    assert [Path(e["path"]).name for e in listed["caches"]] == [old.name, new.name, leftover.name]
    assert [e["status"] for e in listed["caches"]] == ["ok", "ok", "leftover"]
    assert listed["caches"][0]["num_images"] == 10 and listed["caches"][0]["mode"] == "cached"
    text = _run("ls").stdout
    assert "10 x 2 x 4" in text and "abababababab" in text and "3 file(s)" in text

    refused = _run("clean")
    assert refused.exit_code == 2 and "needs --older-than AGE" in refused.stderr
    bad = _run("clean", "--older-than", "a month")
    assert bad.exit_code == 2 and "'a month' is not a duration" in bad.stderr and bad.stderr.count("\n") == 1
    dry = _run("clean", "--older-than", "30d", "--dry-run")
    assert dry.exit_code == 0 and f"would remove {old}" in dry.stdout and old.exists()
    cleaned = _run("clean", "--older-than", "30d")
    assert cleaned.exit_code == 0 and not old.exists() and new.exists() and leftover.exists()
    assert "1 file(s), freed" in cleaned.stdout
    assert _run("clean", "--all", "--dir", str(folder)).exit_code == 0 and not list(folder.iterdir())
    assert "no teacher caches" in _run("ls").stdout
