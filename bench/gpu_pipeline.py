"""One-GPU check: does the training data path keep the step fed? Pipeline img/s ÷ step img/s on GPU batches.

Usage (on a machine with one CUDA GPU; NOT run yet, no GPU was available when it was written):
    python bench/gpu_pipeline.py [--workers N (default: all CPUs)] [--batch 90] [--steps 30] [--warmup 5]
                                 [--jpegs 512] [--paths reduced,baseline] [--mixed-precision bf16]

For each data path (``train.data_path``: ``reduced`` = uint8 views + reduced-size JPEG decode, ``baseline`` =
the previous float32 path) it times, at 224 px with ``--batch`` images x 2 views of synthetic 375..500 px JPEGs:

- ``step``: the resnet18-128 student's forward + backward + AdamW step under autocast, channels_last as the
  training loop sets it (``dmlkd.engine.memory_format.use_channels_last``), repeated on one batch that is
  already on the GPU (the floor);
- ``pipeline``: the same step fed by the real training loader (``dmlkd.data.training.build_train_data``:
  ``ClassBalancedBatchSampler``, ``--workers`` persistent workers, pinned memory on CUDA), each batch copied
  with ``non_blocking=True`` as the training loop does.

It prints img/s for both and the ratio pipeline ÷ step (target ≥ 0.9 with the workers the machine has).
Exits with status 2 and one line on stderr when torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed_steps(step, batches, count: int, warmup: int) -> float:
    """Images/s (before views) of ``count`` steps after ``warmup`` ones; ``batches`` yields device batches."""
    for _ in range(warmup):
        step(next(batches))
    torch.cuda.synchronize()
    start = time.perf_counter()
    images = 0
    for _ in range(count):
        batch = next(batches)
        step(batch)
        images += batch.images.shape[0] // 2
    torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def device_batches(data, device: torch.device):
    """Batches of the training loader, epoch after epoch, copied to ``device`` as the training loop does."""
    epoch = 0
    while True:
        for batch, _replay_k in data.loader_factory(epoch, 0):
            yield type(batch)(*(part.to(device, non_blocking=True) for part in batch))
        epoch += 1


def repeat(batch):
    while True:
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=90)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--jpegs", type=int, default=512)
    parser.add_argument("--paths", default="reduced,baseline")
    parser.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_pipeline: no CUDA device visible to torch; run this on a GPU machine", file=sys.stderr)
        sys.exit(2)
    from data_throughput import write_jpegs

    from dmlkd.config import TrainConfig
    from dmlkd.data.base import DatasetSplits
    from dmlkd.data.training import build_train_data
    from dmlkd.engine.memory_format import use_channels_last
    from dmlkd.models import create_model

    device = torch.device("cuda")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16
    torch.manual_seed(0)
    model = create_model("resnet18-128").to(device).train()
    use_channels_last(model, args.mixed_precision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = model(batch.images).embedding.float().pow(2).sum()
        loss.backward()
        optimizer.step()

    print(f"{torch.cuda.get_device_name(0)}, {args.workers} workers, batch {args.batch} x 2 views, 224 px")
    with tempfile.TemporaryDirectory(prefix="dmlkd-gpu-jpegs-") as folder:
        collection = write_jpegs(Path(folder), args.jpegs, sizes=(375, 500))
        splits = DatasetSplits(name="jpegs", train=collection, test=collection)
        for data_path in args.paths.split(","):
            train = TrainConfig(
                batch_size=args.batch, ipc=2, image_size=224, num_workers=args.workers, data_path=data_path,
                device="cuda", mixed_precision=args.mixed_precision,
            )  # fmt: skip
            data = build_train_data(splits, train)
            pipeline = device_batches(data, device)
            first = next(pipeline)
            floor = timed_steps(step, repeat(first), args.steps, args.warmup)
            fed = timed_steps(step, pipeline, args.steps, args.warmup)
            print(
                f"{data_path:<9} step {floor:8.0f} img/s  pipeline {fed:8.0f} img/s  "
                f"pipeline / step {fed / floor:5.2f}  (views {first.images.dtype}, pin_memory "
                f"{data.loader_factory(0, 0).pin_memory})",
                flush=True,
            )


if __name__ == "__main__":
    main()
