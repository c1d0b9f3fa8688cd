"""Hub pull/push, ``hf://`` loading, model cards and the zoo, with no network.

The real ``huggingface_hub`` download code runs against (A) a pre-populated cache in the Hub's layout with
offline mode on and (B) a stand-in Hub on 127.0.0.1 (stdlib ``ThreadingHTTPServer``). ``huggingface_hub``
reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` at import, so the CLI scenarios run in
subprocesses with those variables, and in-process scenarios pass ``endpoint=`` / ``cache_dir=`` or patch
``huggingface_hub.constants``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

import dmlkd
from dmlkd.checkpoints.card import model_card
from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.checkpoints.hub import load_from_hub, pull, push
from dmlkd.checkpoints.io import load_checkpoint, resolve_checkpoint_dir
from dmlkd.checkpoints.snapshot import hub_provenance
from dmlkd.checkpoints.zoo import find_teacher, zoo_entries
from dmlkd.cli.hub import hub_group, zoo_command
from dmlkd.errors import CheckpointError, ConfigError
from dmlkd.hub_access import HubRef, parse_hub_ref
from dmlkd.models import create_model

REPO = "dmlkd-test/tiny-embedder"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The CLI as users run it.
CLI = "import sys; from dmlkd.cli import main; main(sys.argv[1:], prog_name='dmlkd')"


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real checkpoint folder (googlenet-8: the smallest architecture) with metrics and provenance."""
    torch.manual_seed(0)
    model = create_model("googlenet-8").eval()
    folder = tmp_path_factory.mktemp("ckpt") / "best"
    save_checkpoint(
        folder,
        model,
        extra_tensors={"loss": {"proxies": torch.randn(4, 8)}},
        train_config={"stage": "transfer", "method": {"name": "relaxed_contrastive"}},
        metrics={
            "recall@1": 0.65,
            "recall@2": 0.75,
            "map@r": 0.3,
            "epoch": 3,
            "step": 30,
            "selected": "best",
        },
        provenance={
            "teacher": f"hf://dmlkd-test/teacher@{OTHER_COMMIT}",
            "dataset": "cub",
            "method": "relaxed_contrastive",
            "teacher_digest": "ab" * 32,
        },
    )
    return folder


@pytest.fixture(scope="module")
def reference_embedding(checkpoint: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(checkpoint)[0](_images()).embedding


def _repo_files(checkpoint: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in checkpoint.iterdir()}


def _write_cache(cache: Path, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """The Hub cache layout with plain copies: refs/main holds the commit with NO trailing newline."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


@pytest.fixture
def offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Offline mode on and an empty Hub cache in a temp folder (constants patched for this process)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------------------------- stand-in Hub


def _serve(server: Any, files: dict[str, bytes]) -> None:
    # Files a dmlkd pull must never fetch sit next to the checkpoint files.
    extra = {"pytorch_model.bin": b"\x80\x04 pickle", "notes.txt": b"hello"}
    server.repos[REPO] = {
        "commit": COMMIT,
        "refs": {"main": COMMIT, "v1": COMMIT},
        "files": {**files, **extra},
    }


def _point_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    # ENDPOINT and the file URL template are fixed when huggingface_hub is imported; keep them consistent.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub_server: Any) -> Any:
    """In-process: offline mode off, a temp cache, the endpoint constants pointed at the stand-in Hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _point_at(monkeypatch, hub_server.url)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return hub_server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir()) if parent.exists() else []


# --------------------------------------------------------------------------------------------- references


def test_parse_hub_ref() -> None:
    assert parse_hub_ref("hf://org/name") == HubRef("org/name", None)
    assert parse_hub_ref("org/name@v1.0") == HubRef("org/name", "v1.0")
    assert parse_hub_ref(f"hf://org/name@{COMMIT}").revision == COMMIT
    for bad in ("hf://name-only", "org/name@", "org/na--me", "a/b/c", "hf://"):
        with pytest.raises(CheckpointError, match="malformed Hub reference"):
            parse_hub_ref(bad)


# --------------------------------------------------------------------------------------------- (A) cache


def test_load_hf_reference_from_offline_cache(
    checkpoint: Path, reference_embedding: torch.Tensor, offline_cache: Path
) -> None:
    snapshot = _write_cache(offline_cache, _repo_files(checkpoint))
    for ref in (f"hf://{REPO}", f"hf://{REPO}@main", f"hf://{REPO}@{COMMIT}"):
        assert resolve_checkpoint_dir(ref) == snapshot
        model = dmlkd.load(ref)
        with torch.no_grad():
            assert torch.equal(model(_images()).embedding, reference_embedding)
    assert hub_provenance(snapshot) == {"repo_id": REPO, "commit": COMMIT, "ref": f"hf://{REPO}@{COMMIT}"}
    assert hub_provenance(checkpoint) is None
    _model, record = load_from_hub(f"hf://{REPO}")
    assert record["provenance"]["hub"]["commit"] == COMMIT
    assert record["provenance"]["dataset"] == "cub"  # the checkpoint's own provenance is kept


def test_offline_pull_to_out_records_commit(
    checkpoint: Path, reference_embedding: torch.Tensor, offline_cache: Path, tmp_path: Path
) -> None:
    files = _repo_files(checkpoint)
    _write_cache(offline_cache, {**files, "README.md": b"# card\n"})
    result = pull(f"{REPO}@main", tmp_path / "out" / "teacher")
    assert result.snapshot.commit == COMMIT and result.path == tmp_path / "out" / "teacher"
    assert _leftovers(tmp_path / "out") == ["teacher"]
    assert _leftovers(result.path) == ["README.md", "config.json", "loss.safetensors", "model.safetensors"]
    model, record = load_checkpoint(result.path)
    assert record["provenance"]["hub"] == {
        "repo_id": REPO,
        "revision": "main",
        "commit": COMMIT,
        "ref": f"hf://{REPO}@{COMMIT}",
    }
    with torch.no_grad():
        assert torch.equal(model(_images()).embedding, reference_embedding)
    with pytest.raises(CheckpointError, match=r"already exists and is not empty.*--overwrite"):
        pull(REPO, result.path)
    assert pull(REPO, result.path, overwrite=True).path == result.path


def test_offline_cache_with_trailing_newline_in_ref_is_not_found(checkpoint: Path, offline_cache: Path) -> None:
    # The pitfall from offline-testing.md: the ref file is read verbatim, so "sha\n" names no snapshot.
    _write_cache(offline_cache, _repo_files(checkpoint), commit=COMMIT)
    (offline_cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text(COMMIT + "\n")
    with pytest.raises(CheckpointError, match=r"not .*in the local Hub cache"):
        load_from_hub(REPO)


def test_cli_offline_with_empty_cache_is_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "pulled" / "teacher"
    result = _run_cli(["hub", "pull", f"{REPO}@main", "--out", str(out)], tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert REPO in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "local checkpoint folder" in lines[0]
    assert not (tmp_path / "pulled").exists()


# ----------------------------------------------------------------------------------------- (B) stand-in Hub


def test_cli_pull_from_stand_in_hub_then_offline(
    checkpoint: Path,
    reference_embedding: torch.Tensor,
    hub_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _serve(hub_server, {**_repo_files(checkpoint), "README.md": b"# card\n"})
    out = tmp_path / "pulled"
    result = _run_cli(
        ["hub", "pull", f"{REPO}@v1", "--out", str(out), "--json"],
        tmp_path,
        HF_ENDPOINT=hub_server.url,
        HF_HUB_OFFLINE="0",
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info == {
        "repo_id": REPO,
        "revision": "v1",
        "commit": COMMIT,
        "ref": f"hf://{REPO}@{COMMIT}",
        "path": str(out),
    }
    assert _leftovers(out) == ["README.md", "config.json", "loss.safetensors", "model.safetensors"]
    fetched = {path for method, path in hub_server.requests if "/resolve/" in path}
    assert {path.rsplit("/", 1)[1] for path in fetched} == {
        "README.md",
        "config.json",
        "loss.safetensors",
        "model.safetensors",
    }
    assert any(path.startswith(f"api/models/{REPO}/revision/v1") for _, path in hub_server.requests)
    # The cache the real library wrote now serves hf:// loads with the network off (0 requests).
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub_server.requests.clear()
    with torch.no_grad():
        assert torch.equal(dmlkd.load(f"hf://{REPO}@v1")(_images()).embedding, reference_embedding)
    assert hub_server.requests == []


def _tampered(files: dict[str, bytes]) -> dict[str, bytes]:
    data = bytearray(files["model.safetensors"])
    data[-1] ^= 0xFF
    return {**files, "model.safetensors": bytes(data)}


FAILURES = {
    "unknown repository": ("dmlkd-test/nope", "was not found at .*check the ORG/NAME spelling"),
    "unknown revision": (
        f"{REPO}@no-such-branch",
        "revision 'no-such-branch' does not exist in Hub repository",
    ),
    "unknown commit": (f"{REPO}@{OTHER_COMMIT}", f"revision '{OTHER_COMMIT}' does not exist"),
    "missing config.json": (REPO, "has no config.json: it is not a dmlkd checkpoint"),
    "tampered safetensors": (REPO, "does not match the digest"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_pull_failures_are_one_line_and_leave_nothing(case: str, checkpoint: Path, online: Any, tmp_path: Path) -> None:
    files = _repo_files(checkpoint)
    if case == "missing config.json":
        files.pop("config.json")
    if case == "tampered safetensors":
        files = _tampered(files)
    _serve(online, files)
    ref, pattern = FAILURES[case]
    with pytest.raises(CheckpointError, match=pattern) as caught:
        pull(ref, tmp_path / "out" / "ckpt", endpoint=online.url)
    message = str(caught.value)
    assert "\n" not in message and ref.split("@")[0] in message
    assert not (tmp_path / "out").exists() or _leftovers(tmp_path / "out") == []


def test_pull_with_hub_down_is_fast_one_line_error(
    online: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Connection refused on the first API call: snapshot_download does not retry it, so this is fast.
    down = f"http://127.0.0.1:{_closed_port()}"
    _point_at(monkeypatch, down)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"no network: cannot reach the Hub.*HF_HUB_OFFLINE=1") as caught:
        pull(f"{REPO}@main", tmp_path / "out", endpoint=down)
    assert time.perf_counter() - started < 10, "connection refused must not be retried for long"
    assert REPO in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_pull_without_out_keeps_the_cache_snapshot(checkpoint: Path, online: Any) -> None:
    _serve(online, _repo_files(checkpoint))
    result = pull(f"hf://{REPO}", endpoint=online.url)
    assert result.path == result.snapshot.path and result.path.name == COMMIT
    assert "pytorch_model.bin" not in _leftovers(result.path)


# --------------------------------------------------------------------------------------------- push and card


@pytest.fixture
def fake_hub_api(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the two HfApi calls push makes; record the repo and the file set upload_folder would send."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import CommitInfo

    calls: dict[str, Any] = {}

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> str:
        calls["create_repo"] = (repo_id, kwargs)
        return f"https://hub.test/{repo_id}"

    def upload_folder(
        self: Any, *, repo_id: str, folder_path: Any, allow_patterns: Any = None, **kwargs: Any
    ) -> CommitInfo:
        sent = {
            path.name: path.read_bytes()
            for path in Path(folder_path).iterdir()
            if any(fnmatch(path.name, pattern) for pattern in allow_patterns)
        }
        calls["upload"] = {
            "repo_id": repo_id,
            "files": sent,
            "everything": sorted(os.listdir(folder_path)),
            **kwargs,
        }
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}",
            commit_message="m",
            commit_description="",
            oid=COMMIT,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _run_folder(tmp_path: Path, checkpoint: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "best")
    shutil.copytree(checkpoint, run / "last")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "run.json").write_text(json.dumps({"stage": "transfer", "status": "finished"}))
    return run


def test_push_run_folder_uploads_checkpoint_and_card(
    checkpoint: Path, tmp_path: Path, fake_hub_api: dict[str, Any]
) -> None:
    run = _run_folder(tmp_path, checkpoint)
    main = click.Group(commands=[hub_group])
    result = CliRunner().invoke(main, ["hub", "push", str(run), "my-org/cub-student", "--which", "last"])
    assert result.exit_code == 0, result.output
    assert f"commit {COMMIT}" in result.output and f"hf://my-org/cub-student@{COMMIT}" in result.output
    assert fake_hub_api["create_repo"] == ("my-org/cub-student", {"exist_ok": True, "private": None})
    upload = fake_hub_api["upload"]
    assert sorted(upload["files"]) == ["README.md", "config.json", "loss.safetensors", "model.safetensors"]
    assert upload["everything"] == sorted(upload["files"])  # nothing else (metrics.jsonl, run.json) staged
    assert upload["files"]["model.safetensors"] == (run / "last" / "model.safetensors").read_bytes()
    assert 'dmlkd.load("hf://my-org/cub-student")' in upload["files"]["README.md"].decode()


def test_push_picks_last_and_rejects_bad_sources(
    checkpoint: Path, tmp_path: Path, fake_hub_api: dict[str, Any]
) -> None:
    run = _run_folder(tmp_path, checkpoint)
    assert push(run, "my-org/x").source == run / "last"
    assert push(run, "my-org/x", which="best").source == run / "best"
    assert push(checkpoint, "my-org/x").source == checkpoint
    shutil.rmtree(run / "last")
    with pytest.raises(CheckpointError, match="has no last/ checkpoint; pass --which best"):
        push(run, "my-org/x")
    with pytest.raises(CheckpointError, match="does not exist"):
        push(tmp_path / "missing", "my-org/x")
    with pytest.raises(CheckpointError, match="without @REVISION"):
        push(checkpoint, "my-org/x@main")


def test_push_refused_by_hub_is_one_line(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self: Any, repo_id: str, **kwargs: Any) -> None:
        request = httpx2.Request("POST", "https://hub.test/api/repos/create")
        raise HfHubHTTPError("401 Unauthorized: invalid token", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(CheckpointError, match=r"push to Hub repository my-org/x .*HF_TOKEN") as caught:
        push(checkpoint, "my-org/x")
    assert "\n" not in str(caught.value)


def test_model_card_content(checkpoint: Path) -> None:
    record = json.loads((checkpoint / "config.json").read_text())
    card = model_card(record, "my-org/cub-student", run={"stage": "transfer"})
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "dmlkd" and meta["datasets"] == ["cub"]
    assert {"dmlkd", "knowledge-distillation", "googlenet"} <= set(meta["tags"])
    assert "| Recall@1 | 65.00 |" in body and "| MAP@R | 30.00 |" in body
    assert f"hf://dmlkd-test/teacher@{OTHER_COMMIT}" in body  # teacher repo and revision
    assert "| method | relaxed_contrastive |" in body and "| dataset | cub |" in body
    assert record["files"]["model.safetensors"] in body
    assert '"relaxed_contrastive"' in body.split("Training config")[1]  # the config is embedded
    assert 'dmlkd.load("hf://my-org/cub-student")' in body
    bare = model_card({**record, "metrics": {}, "provenance": {}, "train_config": {}}, "o/n")
    assert "No evaluation metrics were recorded" in bare and "datasets:" not in bare


# --------------------------------------------------------------------------------------------- zoo


@pytest.fixture
def zoo_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("DMLKD_ZOO", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "dmlkd" / "zoo.json"


ENTRY = {
    "dataset": "cub",
    "model": "resnet50-512",
    "repo_id": "my-org/cub-r50",
    "revision": COMMIT,
    "metrics": {"recall@1": 0.699},
    "notes": "converted",
}


def test_builtin_zoo_is_empty(zoo_env: Path) -> None:
    assert zoo_entries() == []
    assert find_teacher("cub", "resnet50-512") is None
    result = CliRunner().invoke(zoo_command, [])
    assert result.exit_code == 0
    assert "built-in zoo is empty" in result.output and str(zoo_env) in result.output


def test_user_zoo_file_entries(zoo_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zoo_env.parent.mkdir(parents=True)
    student = {**ENTRY, "model": "resnet18-128", "role": "student", "method": "relaxed_contrastive"}
    zoo_env.write_text(json.dumps({"entries": [ENTRY, student]}))
    teacher = find_teacher("cub", " resnet50-512")
    assert teacher is not None and teacher.reference == f"hf://my-org/cub-r50@{COMMIT}"
    assert teacher.source == str(zoo_env) and teacher.metrics == {"recall@1": 0.699}
    assert find_teacher("cars", "resnet50-512") is None and find_teacher("cub", "resnet18-128") is None
    result = CliRunner().invoke(zoo_command, ["--json"])
    listed = json.loads(result.output)
    assert [e["model"] for e in listed["entries"]] == ["resnet50-512", "resnet18-128"]
    assert listed["builtin_entries"] == 0
    assert "69.9" in CliRunner().invoke(zoo_command, []).output
    named = tmp_path / "elsewhere.json"
    named.write_text(json.dumps({"entries": []}))
    monkeypatch.setenv("DMLKD_ZOO", str(named))
    assert zoo_entries() == []
    monkeypatch.setenv("DMLKD_ZOO", str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match=r"DMLKD_ZOO=.*does not exist"):
        zoo_entries()


BAD_ENTRIES = {
    "branch revision": ({**ENTRY, "revision": "main"}, "entry 0: revision 'main' must be a pinned 40-hex"),
    "unknown field": ({**ENTRY, "url": "x"}, "entry 0: unknown field 'url'"),
    "missing field": ({k: v for k, v in ENTRY.items() if k != "repo_id"}, "entry 0: missing field 'repo_id'"),
    "bad spec": ({**ENTRY, "model": "resnet51-512"}, "entry 0: unknown architecture 'resnet51'"),
    "bad repo": ({**ENTRY, "repo_id": "no-slash"}, "entry 0: repo_id 'no-slash' is not a Hub repository id"),
    "bad role": ({**ENTRY, "role": "oracle"}, 'entry 0: role "oracle" is not valid'),
    "bad metrics": ({**ENTRY, "metrics": {"recall@1": "high"}}, "entry 0: metrics must map names to numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_zoo_rejects_bad_entries(case: str, zoo_env: Path) -> None:
    entry, pattern = BAD_ENTRIES[case]
    zoo_env.parent.mkdir(parents=True)
    zoo_env.write_text(json.dumps({"entries": [entry]}))
    with pytest.raises(ConfigError, match=pattern) as caught:
        zoo_entries()
    assert str(zoo_env) in str(caught.value) and "\n" not in str(caught.value)


def test_zoo_rejects_bad_files(zoo_env: Path) -> None:
    zoo_env.parent.mkdir(parents=True)
    for text, pattern in (
        ("{not json", "not valid JSON"),
        ("[]", 'must hold one object {"entries"'),
        (json.dumps({"entries": [ENTRY, ENTRY]}), "entry 1: duplicate teacher"),
    ):
        zoo_env.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            zoo_entries()
