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

**Per-view cost, old vs new data path** (``--compare``, on by default): the same JPEGs (``--compare-sizes``,
default 375..500 px, as the public datasets' images) through ``TrainDataset`` with ``data_path="baseline"``
(full decode, float32 views made in the worker) and ``"reduced"`` (DCT-scaled decode where the crop allows
it, uint8 views), in the main process with one torch thread (as in a loader worker), rounds alternating. It
prints the worker CPU time per view (``time.process_time`` around ``dataset[key]`` + ``collate_views``),
the bytes per view that leave the worker (the collated batch tensor), and the ratios new / old (medians
over rounds). The new path's uint8 -> float conversion runs on the training device and is printed
separately (here measured on the CPU, batch-wise).

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
from dmlkd.data.transforms import TrainDataset, collate_views


def write_jpegs(
    folder: Path, count: int, per_class: int = 4, seed: int = 0, sizes: tuple[int, int] = (256, 500)
) -> FileImageCollection:
    """``count`` JPEGs of random size ``sizes[0]..sizes[1]`` px in ``folder``, ``per_class`` images per class."""
    rng = np.random.default_rng(seed)
    relpaths, labels = [], []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
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


def path_cost(collection: ImageCollection, args: argparse.Namespace, data_path: str, seed: int) -> dict:
    """Worker CPU seconds per view and bytes per view of one data path over ``args.batches`` batches."""
    dataset = TrainDataset(collection, args.image_size, views=args.views, seed=seed)
    dataset.data_path = data_path
    sampler = ClassBalancedBatchSampler(
        collection.labels, args.batch_size, images_per_class=2, seed=seed, batches_per_epoch=args.batches
    )
    cpu = views = nbytes = 0.0
    for keys in sampler:
        start = time.process_time()
        batch, _replay_k = collate_views([dataset[key] for key in keys])
        cpu += time.process_time() - start
        views += batch.images.shape[0]
        nbytes += batch.images.element_size() * batch.images.numel()
    convert = 0.0
    if batch.images.dtype == torch.uint8:  # what the device does instead: one conversion per batch
        start = time.process_time()
        batch.images.to(torch.float32).div(255).contiguous()
        convert = (time.process_time() - start) / batch.images.shape[0]
    return {"cpu_per_view": cpu / views, "bytes_per_view": nbytes / views, "convert_per_view": convert}


def compare_paths(collection: ImageCollection, args: argparse.Namespace) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one torch thread
    results: dict[str, list[dict]] = {"baseline": [], "reduced": []}
    for round_index in range(args.rounds):
        for data_path in results:
            results[data_path].append(path_cost(collection, args, data_path, seed=round_index))
    torch.set_num_threads(threads)
    median = {path: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for path, runs in results.items()}
    print(f"\nper-view cost, {args.image_size} px views from {args.compare_sizes} px JPEGs, {args.rounds} rounds:")
    print("| data path | worker CPU ms / view | bytes / view | device-side convert ms / view (CPU here) |")
    print("|---|---:|---:|---:|")
    for path, value in median.items():
        print(
            f"| {path} | {1e3 * value['cpu_per_view']:.3f} | {value['bytes_per_view']:,.0f}"
            f" | {1e3 * value['convert_per_view']:.3f} |"
        )
    old, new = median["baseline"], median["reduced"]
    print(
        f"reduced / baseline: CPU per view {new['cpu_per_view'] / old['cpu_per_view']:.3f}"
        f" (target <= 0.333), bytes per view {new['bytes_per_view'] / old['bytes_per_view']:.3f} (target <= 0.25)"
    )
    runs = ", ".join(
        f"{path} " + "/".join(f"{1e3 * r['cpu_per_view']:.2f}" for r in values) for path, values in results.items()
    )
    print(f"per-round CPU ms/view: {runs}", flush=True)


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
    parser.add_argument("--compare", type=int, default=1, help="1: compare the baseline and reduced data paths")
    parser.add_argument("--compare-sizes", default="375,500", help="JPEG size range of the comparison")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"image_size={args.image_size} views={args.views} batch={args.batch_size} threads={torch.get_num_threads()}")
    student = student_rate(args) if args.student_steps > 0 else None
    if student is not None:
        print(f"student resnet18-128 fwd+bwd+AdamW, batch 64: {student:.1f} rows/s")
    rows = []
    if args.compare:
        with tempfile.TemporaryDirectory(prefix="dmlkd-jpegs-") as folder:
            low, high = (int(v) for v in args.compare_sizes.split(","))
            compare_paths(write_jpegs(Path(folder), args.jpegs, sizes=(low, high)), args)
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
