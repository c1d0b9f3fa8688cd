"""Transfer step with a timm ViT teacher and a timm MobileNetV3 student: student alone vs cached vs online.

Usage:
    python bench/timm_transfer_step.py [--teacher timm/vit_small_patch14_dinov2.lvd142m]
        [--student timm/mobilenetv3_large_100-128] [--image-size 224] [--batch-size 8] [--steps 10]
        [--warmup 2] [--cache-views 2] [--max-classes 8] [--threads N] [--work /tmp/dmlkd-bench-timm]

The teacher is used as published (``--teacher timm/NAME.TAG``, no head): this script writes *random* weights
for it, and for the student's ImageNet tag, into a Hugging Face cache under ``--work`` in timm's Hub layout and
runs with ``HF_HUB_OFFLINE=1``, so the real Hub loading path is used and the timing does not depend on the
weights. The three steps are those of ``bench/transfer_step.py`` (its ``build_steps``: floor = student forward +
backward + optimiser step with a sum-of-squares loss; cached = the trainer's ``TransferModule`` replaying an
exact-replay cache; online = the teacher's forward under no_grad on every step), measured interleaved on the
same pre-collated glyph batches (``batch-size`` images x 2 views) at ``--image-size`` (224: the ViT-S/14 sees
16 x 16 = 256 patches). The cache (K = ``--cache-views``) is built once, untimed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
from pathlib import Path


def publish_random(cache: Path, name_tag: str) -> None:
    """Random weights for ``timm/<name_tag>`` in the Hub cache layout (kept between runs)."""
    import timm
    import torch
    from safetensors.torch import save_file

    repo = cache / f"models--timm--{name_tag}"
    commit = hashlib.sha1(f"random {name_tag}".encode()).hexdigest()
    if (repo / "refs" / "main").is_file():
        return
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model(name_tag, pretrained=False).state_dict().items()}
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="timm/vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--student", default="timm/mobilenetv3_large_100-128")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="distinct images per step (x 2 views)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache-views", type=int, default=2)
    parser.add_argument("--max-classes", type=int, default=8, help="glyph classes (8: 128 train images)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dmlkd-bench-timm"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # huggingface_hub reads these at import: set them first.
    os.environ["HF_HUB_CACHE"] = str(args.work / "hf-cache")
    os.environ["HF_HUB_OFFLINE"] = "1"

    import timm
    import torch

    from dmlkd.config import apply_overrides, from_dict
    from dmlkd.data.catalog import build_splits
    from dmlkd.models.spec import parse_timm_spec
    from dmlkd.models.timm_backbone import pretrained_config, resolve_arch
    from dmlkd.transfer.config import TransferConfig, start_tree

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from transfer_step import build_steps, collect_batches  # the ResNet benchmark's steps, reused as they are

    if args.threads:
        torch.set_num_threads(args.threads)
    student = parse_timm_spec(args.student)
    for arch in (parse_timm_spec(args.teacher, default_dim=0).arch, student.arch):
        name_tag = resolve_arch(arch, True).removeprefix("timm/")
        pretrained_config(arch)
        publish_random(args.work / "hf-cache", name_tag)
    items = [
        f"teacher.ref={args.teacher}",
        f"teacher.cache_dir={args.work / 'cache'}",
        f"teacher.cache_views={args.cache_views}",
        f"teacher.cache_batch_size={args.batch_size * 2}",
        f"student.arch={student.arch}",
        f"student.embedding_dim={student.dim}",
        "student.pretrained=true",
        f"data.options.max_classes={args.max_classes}",
        f"train.batch_size={args.batch_size}",
        "train.ipc=2",
        "train.views=2",
        f"train.image_size={args.image_size}",
        "train.progress=false",
        "train.device=cpu",
    ]
    config = from_dict(TransferConfig, apply_overrides(start_tree("demo-glyphs", "glyphs"), items))
    splits, _bad = build_splits(config.data)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} "
        f"CPUs; teacher {args.teacher} (random weights), student {args.student}; cache views {args.cache_views}; "
        f"{len(splits.train)} train images"
    )
    steps = build_steps(config, splits)  # builds the cache first if needed (not timed)
    teacher_params = sum(p.numel() for p in steps[-1].module.teacher.model.parameters())
    student_params = sum(p.numel() for p in steps[-1].module.student.parameters())
    print(f"teacher parameters {teacher_params:,}, student parameters {student_params:,}")
    batches = collect_batches(config, splits, args.warmup + args.steps)
    rows = len(batches[0][0].images)
    for index, (batch, replay_k) in enumerate(batches):
        for step in steps:  # interleaved: floor, cached, online, floor, ...
            step(batch, replay_k, record=index >= args.warmup)
    medians = {step.name: statistics.median(step.seconds) for step in steps}
    print(
        f"image size {args.image_size}: {rows} rows per step ({args.batch_size} images x 2 views), "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    for step in steps:
        spread = f"{min(step.seconds) * 1e3:.0f}-{max(step.seconds) * 1e3:.0f}"
        print(f"  {step.name:<7} {medians[step.name] * 1e3:8.0f} ms  (range {spread} ms)")
    times = {step.name: step.seconds for step in steps}
    for top, bottom in (("cached", "floor"), ("online", "cached"), ("online", "floor")):
        paired = statistics.median(a / b for a, b in zip(times[top], times[bottom]))
        print(
            f"  {top} / {bottom}: {medians[top] / medians[bottom]:.3f} (ratio of medians), "
            f"{paired:.3f} (median of per-iteration ratios)"
        )


if __name__ == "__main__":
    main()
