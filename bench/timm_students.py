"""Students on the CPU: parameters, eager embedding throughput and exported ONNX latency, side by side.

Usage:
    python bench/timm_students.py [--students timm/mobilenetv3_small_100-128,...] [--image-size 224]
        [--batch-size 16] [--rounds 5] [--threads 1] [--work /tmp/dmlkd-bench-students]

Each student (random weights: the timing does not depend on them) is saved as a dmlkd checkpoint and
exported with ``dmlkd.inference.export.export_model(..., "onnx")``, which passes only if onnxruntime's output
matches the eager model (row cosine >= 0.9999). Then, in ``--rounds`` interleaved rounds (every student once
per round, so a noisy machine affects all alike), it times

* eager throughput: ``model(images)`` under ``no_grad`` in eval mode on a ``batch-size`` batch (img/s);
* ONNX latency: one image through ``onnxruntime.InferenceSession`` (CPUExecutionProvider, ``--threads``
  intra-op threads), and a ``batch-size`` batch (img/s).

and prints the medians. The dmlkd ``resnet18-128`` (torchvision ResNet-18) is included as the reference row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

DEFAULT_STUDENTS = (
    "resnet18-128",
    "timm/resnet18-128",
    "timm/mobilenetv3_small_100-128",
    "timm/mobilenetv3_large_100-128",
    "timm/efficientnet_b0-128",
)


def _timed(function, repeat: int) -> float:
    """Median seconds of ``repeat`` calls of ``function``."""
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default=",".join(DEFAULT_STUDENTS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dmlkd-bench-students"))
    args = parser.parse_args()

    import onnxruntime
    import timm
    import torch

    from dmlkd.checkpoints.folder import save_checkpoint
    from dmlkd.inference.export import export_model
    from dmlkd.models import create_model

    torch.set_num_threads(args.threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{args.threads} thread(s), {os.cpu_count()} CPUs; {args.image_size} px, batch {args.batch_size}"
    )
    rows = {}
    for spec in args.students.split(","):
        torch.manual_seed(0)
        model = create_model(spec).eval()
        folder = args.work / spec.replace("/", "_")
        save_checkpoint(folder / "ckpt", model, train_config={"train": {"image_size": args.image_size}})
        started = time.perf_counter()
        record = export_model(folder / "ckpt", folder / "onnx", "onnx", overwrite=True)
        export_seconds = time.perf_counter() - started
        session = onnxruntime.InferenceSession(
            str(folder / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        rows[spec] = {
            "model": model,
            "session": session,
            "params": sum(p.numel() for p in model.parameters()),
            "cosine": record["parity"]["min_cosine"],
            "export_s": export_seconds,
            "eager": [],
            "onnx1": [],
            "onnxb": [],
        }
    batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    one = batch[:1].numpy()
    many = batch.numpy()
    for round_index in range(args.rounds + 1):  # round 0 is a warm-up
        for row in rows.values():
            model, session = row["model"], row["session"]
            with torch.no_grad():
                eager = _timed(lambda model=model: model(batch), 1)
            onnx1 = _timed(lambda session=session: session.run(["embedding"], {"images": one}), 5)
            onnxb = _timed(lambda session=session: session.run(["embedding"], {"images": many}), 1)
            if round_index:
                row["eager"].append(eager)
                row["onnx1"].append(onnx1)
                row["onnxb"].append(onnxb)
    print(f"median of {args.rounds} interleaved rounds")
    print(
        f"| student | parameters | eager img/s (batch {args.batch_size}) | ONNX ms (batch 1) | "
        f"ONNX img/s (batch {args.batch_size}) | parity min cosine |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for spec, row in rows.items():
        eager = args.batch_size / statistics.median(row["eager"])
        onnx1 = statistics.median(row["onnx1"]) * 1e3
        onnxb = args.batch_size / statistics.median(row["onnxb"])
        print(
            f"| {spec} | {row['params'] / 1e6:.2f} M | {eager:.0f} | {onnx1:.1f} | {onnxb:.0f} | {row['cosine']:.6f} |"
        )


if __name__ == "__main__":
    main()
