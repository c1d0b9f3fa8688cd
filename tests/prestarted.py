"""Start ``python -m MODULE ARGS`` or ``python SCRIPT ARGS`` as a fork of a process that imported torch already.

Tests that run the CLI as a separate process (kill/resume, SIGINT, a second process on a run folder, bad
environments) would each spend about 3 s of CPU importing torch, torchvision and torch._dynamo before the
command starts; on a 2-core machine that was a third of the suite's CPU. Here one server per test process
imports them once (``serve``) and forks a child per command. The child is a real process: its own pid, exit
status, signals (SIGKILL, SIGINT and SIGTERM reach it as they reach a fresh interpreter), files, working
folder and environment; it then runs the module or script as ``__main__`` and exits through the interpreter's
normal shutdown, so an uncaught exception, ``sys.exit`` and Ctrl-C end it as they end ``python``.

A server is started with the command's own values of the variables read at start-up (``PYTHON*``, ``OMP_*``,
``LD_*``, ``TORCH*``, ...): a command that changes one of them gets a server started with it. It imports no
dmlkd code and nothing else that reads its settings from the environment at import (huggingface_hub,
accelerate), so each child reads those itself. Commands other than ``sys.executable`` with ``-m`` or a script,
every command off Linux, and every command when ``DMLKD_TEST_FRESH_PYTHON=1`` start a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import IO, Any

PRELOADED = ("torch", "torchvision", "torch._dynamo", "numpy", "PIL.Image", "safetensors.torch")
# Read by the interpreter, the OpenMP runtime or torch when they start: a child would not see a change in them
# made after its server started, so a command with other values than a running server's gets its own server.
STARTUP_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "LD_", "TORCH", "CUDA", "NVIDIA_")
FRESH_VARIABLE = "DMLKD_TEST_FRESH_PYTHON"
_MESSAGE = 1 << 20


# ------------------------------------------------------------------------------------------------- server


def serve(name: str) -> None:
    """Import ``PRELOADED``, say ``ready`` on stdout, then fork one child per request until stdin closes; then
    report the exit of the children still running and return."""
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind("\0" + name)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    os.write(1, b"ready\n")
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection its exit status goes back on
    inputs: list[Any] = [listener, 0, wake_read]
    while inputs != [wake_read] or waiting:
        ready, _, _ = select.select(inputs, [], [])
        if 0 in ready and not os.read(0, 1):
            inputs = [wake_read]  # closed (the test process has gone, or closed this server): no new requests
            continue
        if wake_read in ready:
            os.read(wake_read, 4096)
        if listener in ready:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, _MESSAGE, 3)
            pid = os.fork()
            if pid == 0:
                for held in (listener, *waiting.values()):
                    held.close()
                for fd in (wake_read, wake_write):
                    os.close(fd)
                _child(json.loads(message), fds, connection)
            for fd in fds:
                os.close(fd)
            connection.send(json.dumps({"pid": pid}).encode())
            waiting[pid] = connection
        _reap(waiting)


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        connection = waiting.pop(pid)
        try:
            connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
        except OSError:  # the test let go of the process without waiting for it
            pass
        connection.close()


def _child(request: dict[str, Any], fds: list[int], connection: socket.socket) -> None:
    """In the forked child: take the request's files, environment and folder, run it as ``__main__``."""
    import runpy

    connection.close()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    target = request["argv"]
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        sys.path[0] = request["cwd"]  # as `python -m` puts the working folder first
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(target)
        sys.path[0] = os.path.dirname(os.path.abspath(target[0]))
        runpy.run_path(target[0], run_name="__main__")
    raise SystemExit(0)  # exceptions above leave through the interpreter's own handling, as in `python`


# ------------------------------------------------------------------------------------------------- client


class _Server:
    """A server process started with ``environment``; its children see that environment's start-up values."""

    def __init__(self, environment: Mapping[str, str]) -> None:
        self.name = f"dmlkd-prestarted-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(environment),
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the prestarted-process server did not start (exit {self.process.wait()})")

    def alive(self) -> bool:
        """Running and taking requests."""
        return self.process.poll() is None and not self.process.stdin.closed  # type: ignore[union-attr]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the server takes no new requests, reports its running children, ends


MAX_SERVERS = 2  # per test process; one per set of start-up values, the least recently used one closed
_servers: dict[tuple[tuple[str, str], ...], _Server] = {}


def _startup_values(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, value) for name, value in env.items() if name.startswith(STARTUP_PREFIXES)))


def _server_for(env: Mapping[str, str]) -> _Server:
    """The server started with ``env``'s start-up values (started now if there is none)."""
    key = _startup_values(env)
    server = _servers.pop(key, None)
    if server is None or not server.alive():
        while len(_servers) >= MAX_SERVERS:
            _servers.pop(next(iter(_servers))).close()
        server = _Server(env)
    _servers[key] = server  # most recently used last
    return server


def _target(command: Sequence[str]) -> list[str] | None:
    """``command`` without the interpreter when it is ``python -m MODULE ...`` or ``python SCRIPT ...``."""
    if len(command) < 2 or command[0] != sys.executable:
        return None
    if command[1] == "-m":
        return list(command[1:]) if len(command) > 2 else None
    return None if command[1].startswith("-") else list(command[1:])


def prestartable(command: Sequence[str]) -> bool:
    """Whether ``command`` runs as a fork of a server (else: a fresh interpreter)."""
    return sys.platform == "linux" and os.environ.get(FRESH_VARIABLE) != "1" and _target(command) is not None


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a child of the server."""

    def __init__(self, args: list[str], connection: socket.socket, outputs: dict[str, IO[bytes] | None], text: bool):
        self.args = args
        self._connection = connection
        self._outputs = outputs
        self._text = text
        self.pid: int = json.loads(connection.recv(_MESSAGE))["pid"]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._connection], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        assert self.returncode is not None
        return self.returncode

    def _read_status(self) -> None:
        message = self._connection.recv(_MESSAGE)
        self._connection.close()
        if not message:
            raise RuntimeError(f"the prestarted-process server ended before process {self.pid}")
        self.returncode = json.loads(message)["returncode"]

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        self.wait(timeout)
        return self._read("stdout"), self._read("stderr")

    def _read(self, name: str) -> Any:
        handle = self._outputs.get(name)
        if handle is None:
            return None
        handle.seek(0)
        data = handle.read()
        handle.close()
        self._outputs[name] = None
        return data.decode() if self._text else data

    def send_signal(self, number: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Process = ForkedProcess | subprocess.Popen  # what ``popen`` returns


def _output_fd(choice: Any, default_fd: int, opened: list[IO[bytes]]) -> tuple[int, IO[bytes] | None]:
    """The fd the child writes to, and the file to read back (``PIPE``: a temporary file, read after exit)."""
    if choice is None:
        return default_fd, None
    if choice == subprocess.DEVNULL:
        handle = open(os.devnull, "r+b")
        opened.append(handle)
        return handle.fileno(), None
    if choice == subprocess.PIPE:
        capture = tempfile.TemporaryFile()
        return capture.fileno(), capture
    raise ValueError(f"unsupported stdout/stderr choice {choice!r}: None, DEVNULL, PIPE (or STDOUT for stderr)")


def popen(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout: Any = None,
    stderr: Any = None,
    text: bool = False,
) -> Process:
    """``subprocess.Popen(command, ...)``, forked from the server where ``prestartable``; stdin is /dev/null."""
    command = [str(part) for part in command]
    if not prestartable(command):
        return subprocess.Popen(
            command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=text
        )
    opened: list[IO[bytes]] = []
    stdin_fd, _ = _output_fd(subprocess.DEVNULL, 0, opened)
    stdout_fd, stdout_file = _output_fd(stdout, 1, opened)
    if stderr == subprocess.STDOUT:
        stderr_fd, stderr_file = stdout_fd, None
    else:
        stderr_fd, stderr_file = _output_fd(stderr, 2, opened)
    environment = dict(os.environ if env is None else env)
    request = {
        "argv": _target(command),
        "env": environment,
        "cwd": os.path.abspath(cwd if cwd is not None else os.getcwd()),
    }
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.connect("\0" + _server_for(environment).name)
    socket.send_fds(connection, [json.dumps(request).encode()], [stdin_fd, stdout_fd, stderr_fd])
    for handle in opened:
        handle.close()
    return ForkedProcess(command, connection, {"stdout": stdout_file, "stderr": stderr_file}, text)


def run(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    capture_output: bool = False,
    text: bool = False,
    timeout: float | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(command, ...)`` through ``popen``."""
    pipe = subprocess.PIPE if capture_output else None
    process = popen(command, env=env, cwd=cwd, stdout=pipe, stderr=pipe, text=text)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    result = subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


if __name__ == "__main__":
    serve(sys.argv[1])
