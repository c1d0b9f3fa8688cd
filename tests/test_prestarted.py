"""tests/prestarted.py: a command forked from the server behaves as the same command in a fresh interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import prestarted

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server forks (Linux); elsewhere: subprocess")

SCRIPT = """
import os, sys, time
mode = sys.argv[1]
print("argv", sys.argv[1:], "cwd", os.getcwd(), "var", os.environ.get("PRESTARTED_PROBE"))
print("path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print("to stderr", file=sys.stderr)
if mode == "exit":
    sys.exit(3)
if mode == "raise":
    1 / 0
if mode == "wait":
    sys.stdout.flush()
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
"""


@pytest.fixture()
def script(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def _both(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    assert prestarted.prestartable(command)
    forked = prestarted.run(command, capture_output=True, text=True, timeout=60, **kwargs)
    fresh = subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)
    return forked, fresh


@pytest.mark.parametrize("mode", ["ok", "exit", "raise"])
def test_output_exit_status_argv_folder_and_environment_equal_a_fresh_interpreter(
    script: Path, tmp_path: Path, mode: str
) -> None:
    env = {**os.environ, "PRESTARTED_PROBE": "seen"}
    forked, fresh = _both([sys.executable, str(script), mode, "x y"], env=env, cwd=tmp_path)
    assert forked.returncode == fresh.returncode == {"ok": 0, "exit": 3, "raise": 1}[mode]
    assert forked.stdout == fresh.stdout and f"cwd {tmp_path}" in forked.stdout and "var seen" in forked.stdout
    if mode == "raise":  # the same error, reported by the interpreter (the server's frames are in between)
        assert forked.stderr.startswith("to stderr\nTraceback") and forked.stderr.endswith("division by zero\n")
        assert fresh.stderr.endswith("ZeroDivisionError: division by zero\n")
    else:
        assert forked.stderr == fresh.stderr == "to stderr\n"


def test_a_module_runs_as_main_from_the_working_folder(tmp_path: Path) -> None:
    package = tmp_path / "probe_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("import sys; print(sys.argv[0] == __file__, sys.argv[1:], __name__)")
    forked, fresh = _both([sys.executable, "-m", "probe_package", "a"], cwd=tmp_path)
    assert forked.returncode == fresh.returncode == 0, forked.stderr + fresh.stderr
    assert forked.stdout == fresh.stdout == "True ['a'] __main__\n"


def test_it_is_forked_from_a_process_that_holds_torch(script: Path, tmp_path: Path) -> None:
    check = tmp_path / "check.py"
    check.write_text("import sys; print('torch' in sys.modules)")
    assert prestarted.run([sys.executable, str(check)], capture_output=True, text=True).stdout == "True\n"
    assert subprocess.run([sys.executable, str(check)], capture_output=True, text=True).stdout == "False\n"


@pytest.mark.parametrize(
    ("number", "expected"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)]
)
def test_signals_reach_the_process(script: Path, number: int, expected: int) -> None:
    process = prestarted.popen([sys.executable, str(script), "wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert isinstance(process, prestarted.ForkedProcess) and process.poll() is None
    time.sleep(0.5)  # into the sleep, past the script's start
    process.send_signal(number)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == expected
    assert (b"interrupted" in stderr) == (number == signal.SIGINT)


def test_stderr_into_stdout(script: Path) -> None:
    command = [sys.executable, str(script), "ok"]
    forked = prestarted.popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fresh = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert forked.communicate(timeout=60) == fresh.communicate(timeout=60)
    assert forked.returncode == fresh.returncode == 0


def test_a_closed_server_reports_its_running_process_then_ends(script: Path) -> None:
    process = prestarted.popen([sys.executable, str(script), "wait"], stdout=subprocess.DEVNULL)
    server = prestarted._server_for(dict(os.environ))
    server.close()  # as when the test process ends, or a third set of start-up values evicts it
    time.sleep(0.5)
    assert process.poll() is None and server.process.poll() is None and not server.alive()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM
    assert server.process.wait(timeout=30) == 0


def test_timeout_kills_the_process(script: Path) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        prestarted.run([sys.executable, str(script), "wait"], timeout=0.5)
    assert time.monotonic() - started < 10


def test_a_changed_start_up_variable_is_seen_as_in_a_fresh_interpreter(tmp_path: Path) -> None:
    check = tmp_path / "check.py"
    check.write_text("import sys, torch; print(torch.get_num_threads(), sys.path.count(sys.argv[1]))")
    extra = str(tmp_path / "extra")
    paths = [extra, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(paths)}
    forked, fresh = _both([sys.executable, str(check), extra], env=env)
    assert forked.stdout == fresh.stdout == "2 1\n", forked.stderr + fresh.stderr
    assert len(prestarted._servers) <= prestarted.MAX_SERVERS


def test_fresh_python_variable_and_other_commands_use_subprocess(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not prestarted.prestartable([sys.executable, "-c", "print(1)"])
    assert not prestarted.prestartable(["/bin/echo", "x"])
    monkeypatch.setenv(prestarted.FRESH_VARIABLE, "1")
    assert not prestarted.prestartable([sys.executable, str(script), "ok"])
