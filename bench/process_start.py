"""What tests/prestarted.py buys the test suite: one short ``dmlkd teacher train`` as a fresh interpreter
against the same command forked from the prestarted server, alternating, in one run.

Usage (from the repository root):
    python bench/process_start.py [--repeats 5]

Each command trains the tests' tiny teacher for 4 steps (a new run folder each time). Printed: the median
wall seconds and the median CPU seconds (user + system, of the process and what it waited for) of each way,
and the fresh/forked ratios. The server's own start (once per test worker) is printed separately.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import prestarted

ARGS = ["teacher", "train", "--model", "resnet18-8", "--dataset", "glyphs", "--set", "data.options.max_classes=4"]
ARGS += ["--batch-size", "16", "--ipc", "8", "--epochs", "1", "--no-progress", "--set", "eval.nmi=false"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fresh(command: list[str]) -> tuple[float, float]:
    import subprocess

    cpu, started = _children_cpu(), time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started, _children_cpu() - cpu


def _forked(command: list[str]) -> tuple[float, float]:
    # The forked process is the server's child: its CPU time is read from /proc before it is reaped.
    started = time.perf_counter()
    process = prestarted.popen(command, stdout=-1, stderr=-1)
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = 0.0
    while process.poll() is None:
        try:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
        except (FileNotFoundError, IndexError, ValueError):
            pass
        time.sleep(0.02)
    assert process.wait() == 0, process.communicate()[1]
    return time.perf_counter() - started, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch = Path(tempfile.mkdtemp(prefix="process-start-"))
    os.environ.setdefault("DMLKD_CACHE", str(scratch / "cache"))
    started = time.perf_counter()
    prestarted._server_for(dict(os.environ))
    print(f"server start (once per test worker): {time.perf_counter() - started:.2f} s wall")
    results: dict[str, list[tuple[float, float]]] = {"fresh": [], "forked": []}
    for index in range(options.repeats + 1):  # the first round warms the glyph cache and the file cache
        for way, run in (("fresh", _fresh), ("forked", _forked)):
            out = scratch / f"{way}-{index}"
            measured = run([sys.executable, "-m", "dmlkd", *ARGS, "--out", str(out)])
            if index:
                results[way].append(measured)
    medians = {way: [statistics.median(column) for column in zip(*rows)] for way, rows in results.items()}
    for way, (wall, cpu) in medians.items():
        print(f"{way:7s} wall {wall:5.2f} s  cpu {cpu:5.2f} s  (median of {options.repeats})")
    (fresh_wall, fresh_cpu), (forked_wall, forked_cpu) = medians["fresh"], medians["forked"]
    print(f"fresh/forked: wall {fresh_wall / forked_wall:.2f}x, cpu {fresh_cpu / forked_cpu:.2f}x")


if __name__ == "__main__":
    main()
