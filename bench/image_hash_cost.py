"""What keying the teacher cache by image *contents* costs: cold hash, warm side index, one file changed.

Usage:
    python bench/image_hash_cost.py [--files 5000] [--size 64] [--repeats 3] [--work DIR]

Writes ``--files`` random RGB PNGs of ``--size`` px (a CUB-like small-file case), then times, ``--repeats``
times each (medians): a cold ``images_digest`` (every file read and hashed, no side index), a warm one (the
side index answers: one ``stat`` per file), and a warm one after one file was rewritten (one re-hash). For
scale it also times decoding every image once (what any epoch of training pays at least).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dmlkd.data.base import FileImageCollection
from dmlkd.transfer.cache.content import images_digest


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dmlkd-hash-bench-"))
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"{i:05d}.png" for i in range(args.files)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(images / name)
    collection = FileImageCollection(images, names, [0] * len(names))
    total_bytes = sum((images / name).stat().st_size for name in names)

    cold, warm, changed, decode = [], [], [], []
    for repeat in range(args.repeats):
        index = work / f"index-{repeat}"
        cold.append(_timed(lambda: images_digest(collection, None)))
        images_digest(collection, index)  # fill the side index
        warm.append(_timed(lambda index=index: images_digest(collection, index)))
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(images / names[7])
        changed.append(_timed(lambda index=index: images_digest(collection, index)))
        decode.append(_timed(lambda: [collection.load(i) for i in range(len(collection))]))
    median = statistics.median
    print(f"{args.files} PNG files of {args.size} px, {total_bytes / 1e6:.1f} MB; medians of {args.repeats}")
    print(f"cold hash (no index):      {median(cold):7.3f} s  ({1e6 * median(cold) / args.files:6.1f} us/file)")
    print(f"warm index (stat only):    {median(warm):7.3f} s  ({1e6 * median(warm) / args.files:6.1f} us/file)")
    print(f"warm, one file changed:    {median(changed):7.3f} s")
    print(f"decode every image once:   {median(decode):7.3f} s")
    print(f"ratios: cold/decode {median(cold) / median(decode):.3f}, warm/cold {median(warm) / median(cold):.3f}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
