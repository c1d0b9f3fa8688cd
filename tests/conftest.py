"""Shared test setup: an isolated dmlkd cache, no network, small thread counts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

# ------------------------------------------------------------------------------------------ pytest-xdist
# setup.cfg runs the suite in worker processes (``-n auto --dist loadscope``): every module runs whole on one
# worker, so module fixtures are built once. Session fixtures are built once per worker.

# The modules that take longest (subprocess runs, full teacher/transfer/pipeline runs; roughly slowest first): a
# worker that started one of them last would keep the whole run waiting, so they are handed out first. A module
# not named here goes after them in its usual order; the list only changes the order, never what runs.
SLOW_MODULES = (  # from a one-process run's --durations (seconds of wall time on a busy machine)
    "test_seed_methods_demo.py",  # 775
    "test_teacher_training.py",  # 483
    "test_run_lifecycle.py",  # 412
    "test_transfer_set.py",  # 314
    "test_bad_inputs.py",  # 244
    "test_transfer_training.py",  # 214
    "test_timm.py",  # 154
    "test_teacher_losses_extra.py",  # 114
    "test_teacher_cache_key.py",  # 98
    "test_pipelines.py",  # 74
    "test_pipeline_distributed.py",  # 70
    "test_teacher_cache.py",  # 55
    "test_distributed.py",  # 51
    "test_crash_safety.py",  # 46
)
MAX_AUTO_WORKERS = 4  # each worker holds torch and a few models (~2 GB): more would not pay on a small machine


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per usable core plus one, at most ``MAX_AUTO_WORKERS`` (PYTEST_XDIST_AUTO_NUM_WORKERS
    wins). Many tests wait on subprocesses, fsync and polling; the extra worker fills that idle time (measured on
    2 cores: the whole suite in 8 min 20 s with 3 workers against about 11 min with 2)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores + 1, MAX_AUTO_WORKERS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, put the slowest modules first (a stable sort: the order inside a module is unchanged)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: index for index, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))


def _session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every worker of this run shares (the base temporary folder itself without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    # One glyph cache per test run, shared by the xdist workers (rendering is deterministic and cache files are
    # replaced atomically, so sharing it is safe); subprocesses started by tests inherit these variables.
    if "DMLKD_CACHE" not in os.environ:
        cache = _session_root(tmp_path_factory) / "dmlkd-cache"
        cache.mkdir(exist_ok=True)
        os.environ["DMLKD_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Subprocesses (the CLI, torchrun, accelerate) too: two workers each running a 2-thread child would
    # oversubscribe 2 cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    # Tiny models are much slower with two intra-op threads on a busy 2-core machine than with one.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _session_shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where session fixtures keep their folders: made before any module starts (autouse, session scope), so
    ``_module_folders_removed`` never deletes it."""
    folder = tmp_path_factory.getbasetemp() / "session-shared"
    folder.mkdir(exist_ok=True)
    (_session_root(tmp_path_factory) / SHARED_RUNS).mkdir(exist_ok=True)  # for _shared_run, made as early
    return folder


# The tiny glyph runs several modules make: a 16-class glyph subset, 4 classes x 4 images per step, no NMI, no
# evaluation at start (test modules import these lists: ``from tests.conftest import TINY_GLYPH_DATA``).
TINY_GLYPH_DATA = [
    "--dataset",
    "glyphs",
    "--set",
    "data.options.max_classes=16",
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
TINY_GLYPH_ARGS = ["--model", "resnet18-16", *TINY_GLYPH_DATA]  # a teacher run on them
TINY_TEACHER_ARGS = ["--max-steps", "2", *TINY_GLYPH_ARGS]  # the session's tiny teacher: 2 steps


# The demo runs: ResNet-18-32 on a 40-class glyph subset (20 training classes), no NMI; the untrained network is
# evaluated first (the demo recipe). The seed-method tests train their losses on it; the demo teacher (norm
# softmax, 50 steps) is shared by the test that checks it learns and the transfer-set tests.
DEMO_DATA = [
    "--dataset",
    "glyphs",
    "--set",
    "data.options.max_classes=40",
    "--model",
    "resnet18-32",
    "--no-progress",
    "--set",
    "eval.nmi=false",
]
DEMO_TEACHER_ARGS = [*DEMO_DATA, "--loss", "norm_softmax", "--batch-size", "64", "--ipc", "4", "--epochs", "5"]
DEMO_TEACHER_ARGS += ["--set", "train.eval_every=5"]


SHARED_RUNS = "shared-runs"  # in the folder the workers share (the base temporary folder without xdist)


def _shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> Path:
    """A finished ``dmlkd teacher train ARGS`` run, trained once per test run and shared read-only by every
    xdist worker: the first worker to ask trains it under a file lock, the others wait for it. A test that
    changes it must work on a ``shutil.copytree`` copy."""
    import fcntl

    from click.testing import CliRunner

    from dmlkd.cli import main

    folder = _session_root(tmp_path_factory) / SHARED_RUNS
    out = folder / name
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        record = out / "run.json"
        if record.is_file() and json.loads(record.read_text()).get("status") == "finished":
            return out
        shutil.rmtree(out, ignore_errors=True)  # a run a failed worker left
        result = CliRunner().invoke(main, ["teacher", "train", "--out", str(out), *args])
        assert result.exit_code == 0, result.stderr + repr(result.exception)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny teacher (``TINY_TEACHER_ARGS``), shared by every worker (see ``_shared_run``)."""
    return _shared_run(tmp_path_factory, "tiny-teacher", TINY_TEACHER_ARGS)


@pytest.fixture(scope="session")
def demo_teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo teacher (``DEMO_TEACHER_ARGS``), shared by every worker (see ``_shared_run``)."""
    return _shared_run(tmp_path_factory, "demo-teacher", DEMO_TEACHER_ARGS)


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Delete the folders a test module's fixtures made (checkpoints: several GB per session) when it ends.

    A passing test's own ``tmp_path`` is deleted at once (setup.cfg's retention policy); module-scoped
    fixtures would otherwise keep theirs to the end of the session. A module with a failure keeps everything.
    """
    base = tmp_path_factory.getbasetemp()
    before = {child.name for child in base.iterdir()}
    failures = request.session.testsfailed
    yield
    if request.session.testsfailed != failures:
        return
    for child in base.iterdir():
        if child.name not in before and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


@pytest.fixture
def tiny_glyph_args() -> list[str]:
    """CLI options for a fast teacher run on a 16-class glyph subset (``TINY_GLYPH_ARGS``, a fresh list)."""
    return list(TINY_GLYPH_ARGS)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- stand-in Hub
# huggingface_hub talks to it as to huggingface.co: the revision and tree API and HEAD/GET on resolve URLs.


class _HubHandler(BaseHTTPRequestHandler):
    """Answers the calls snapshot_download makes: revision and tree API, HEAD/GET resolve."""

    server: Any

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _answer(self, send_body: bool) -> None:
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        self.server.requests.append((self.command, "/".join(parts)))
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            self._api("/".join(parts[2:4]), parts[4], "/".join(parts[5:]), send_body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), send_body)
        else:
            self._send(404, b"not found", {}, send_body)

    def _commit(self, repo_id: str, revision: str, send_body: bool) -> tuple[dict[str, Any], str] | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, send_body)
            return None
        commit = repo["refs"].get(revision, revision if revision == repo["commit"] else None)
        if commit is None:
            self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, send_body)
            return None
        return repo, commit

    def _api(self, repo_id: str, kind: str, revision: str, send_body: bool) -> None:
        found = self._commit(repo_id, revision, send_body)
        if found is None:
            return
        repo, commit = found
        if kind == "revision":
            payload: Any = {
                "id": repo_id,
                "sha": commit,
                "siblings": [{"rfilename": f} for f in repo["files"]],
            }
        else:
            payload = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in repo["files"].items()
            ]
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, send_body)

    def _resolve(self, repo_id: str, revision: str, file_name: str, send_body: bool) -> None:
        found = self._commit(repo_id, revision, send_body)
        if found is None:
            return
        repo, commit = found
        data = repo["files"].get(file_name)
        if data is None:
            self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, send_body)
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self._send(200, data, headers, send_body)


def _serve_hub() -> Iterator[Any]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.repos, server.requests = {}, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()  # after shutdown() alone the socket still accepts and clients hang
    thread.join(5)


@pytest.fixture
def hub_server() -> Iterator[Any]:
    """A stand-in Hub for one test: fill ``server.repos[repo_id] = {"commit", "refs", "files"}``; every request
    is recorded in ``server.requests`` as (method, path)."""
    yield from _serve_hub()


@pytest.fixture(scope="module")
def module_hub_server() -> Iterator[Any]:
    """The same stand-in Hub, shared by a module's tests (which must not change its repositories)."""
    yield from _serve_hub()
