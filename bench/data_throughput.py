"""Training-data throughput (decode + augment) per loader worker vs what the student step consumes.

Usage:
    python bench/data_throughput.py [--workers 0,1,2] [--batches 6] [--image-size 224] [--views 2]
                                    [--batch-size 32] [--jpegs 192] [--student-steps 3] [--threads N]

Sources, both through the real training path (``dmlkd.data.transforms.TrainDataset`` with random-resized-crop
and flip views, ``ClassBalancedBatchSampler``, ``dmlkd.data.loading.make_train_loader``):

- ``glyphs``: the built-in demo data (32 px grayscale arrays in memory, no decoding), upscaled to the crop;
- ``jpeg``: a folder of synthetic JPEGs (random sizes 256..500 px, smooth colour fields plus noise, quality 90)
  that the script writes into a temporary folder and reads back as a ``FileImageCollection``.

For each source and worker count the loader is started (workers are persistent), one batch is drawn to warm
it up, then ``--batches`` batches are timed. Throughput is counted in images decoded per second and in view
tensors (rows of the training batch) per second; per worker divides by ``max(1, num_workers)``.

The student's consumption is the median time of a resnet18-128 forward + backward + AdamW step on random
``(64, 3, S, S)`` input on this machine; the printed ratio is loader rows/s over student rows/s (> 1: the
loader keeps up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmlkd.data.base import FileImageCollection, ImageCollection
from dmlkd.data.loading import make_train_loader
from dmlkd.data.samplers import ClassBalancedBatchSampler
from dmlkd.data.transforms import TrainDataset


def write_jpegs(folder: Path, count: int, per_class: int = 4, seed: int = 0) -> FileImageCollection:
    """``count`` JPEGs of random size 256..500 px in ``folder``, ``per_class`` images per class."""
    rng = np.random.default_rng(seed)
    relpaths, labels = [], []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(256, 501, size=2))
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        scale = rng.uniform(20, 80, size=3)
        field = np.stack([np.sin(xs / s + ys / (1.7 * s) + p) for s, p in zip(scale, phase)], axis=-1)
        noisy = 127.5 * (field + 1) + rng.normal(0, 12, size=field.shape)
        name = f"{index:05d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / name, quality=90)
        relpaths.append(name)
        labels.append(index // per_class)
    return FileImageCollection(folder, relpaths, labels)


def glyph_collection() -> ImageCollection:
    from dmlkd.data.glyphs import build_glyphs

    return build_glyphs().train


def loader_rate(collection: ImageCollection, args: argparse.Namespace, workers: int) -> dict[str, float]:
    """Images/s and rows/s of the training loader over ``args.batches`` batches after one warm-up batch."""
    dataset = TrainDataset(collection, args.image_size, views=args.views, seed=0)
    sampler = ClassBalancedBatchSampler(
        collection.labels, args.batch_size, images_per_class=2, seed=0, batches_per_epoch=args.batches + 1
    )
    loader = make_train_loader(dataset, sampler, num_workers=workers)
    batches = iter(loader)
    next(batches)  # starts the workers
    images = rows = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        batch, _replay_k = next(batches)
        rows += batch.images.shape[0]
        images += batch.images.shape[0] // args.views
    seconds = time.perf_counter() - start
    del batches, loader
    return {"images_per_s": images / seconds, "rows_per_s": rows / seconds}


def student_rate(args: argparse.Namespace, batch: int = 64) -> float:
    """Rows/s of a resnet18-128 forward + backward + AdamW step at ``args.image_size`` on this machine (CPU)."""
    from dmlkd.models import create_model

    torch.manual_seed(0)
    student = create_model("resnet18-128").train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, args.image_size, args.image_size)
    times = []
    for step in range(args.student_steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        student(images).embedding.pow(2).sum().backward()
        optimizer.step()
        if step > 0:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per case")
    parser.add_argument("--batch-size", type=int, default=32, help="distinct images per batch (before views)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--jpegs", type=int, default=192, help="synthetic JPEGs to write")
    parser.add_argument("--sources", default="glyphs,jpeg")
    parser.add_argument("--student-steps", type=int, default=3, help="timed student steps (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"image_size={args.image_size} views={args.views} batch={args.batch_size} threads={torch.get_num_threads()}")
    student = student_rate(args) if args.student_steps > 0 else None
    if student is not None:
        print(f"student resnet18-128 fwd+bwd+AdamW, batch 64: {student:.1f} rows/s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dmlkd-jpegs-") as folder:
        for source in args.sources.split(","):
            collection = write_jpegs(Path(folder), args.jpegs) if source == "jpeg" else glyph_collection()
            for count in workers:
                rate = loader_rate(collection, args, count)
                rows.append((source, count, rate))
                print(f"{source} workers={count}: {rate['images_per_s']:.1f} images/s", flush=True)
    print("\n| source | num_workers | images/s | rows/s | images/s per worker | loader rows/s ÷ student rows/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for source, count, rate in rows:
        ratio = f"{rate['rows_per_s'] / student:.2f}" if student else "n/a"
        per_worker = rate["images_per_s"] / max(1, count)
        cells = f"{rate['images_per_s']:.1f} | {rate['rows_per_s']:.1f} | {per_worker:.1f}"
        print(f"| {source} | {count} | {cells} | {ratio} |")


if __name__ == "__main__":
    main()
