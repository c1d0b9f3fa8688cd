#!/usr/bin/env bash
# One-GPU check of dmlkd (about 1 minute on one H100, plus the start-up). Prints two tables:
#
# 1. Training images/s at 224 px under bf16 autocast (the training loop's mixed_precision=bf16), batch
#    BATCH images x 2 views: the resnet18-128 student alone, the resnet50-512 alone (the teacher stage's
#    model), and the transfer step r18-128 <- r50-512 with the cached and the online teacher. The transfer
#    steps use the trainer's own code (build_teacher_source, build_method, TransferModule, param_groups,
#    build_optimizer) on batches from the real training loader (glyph demo data upscaled to 224 px); the
#    teacher is a random-init resnet50-512 (the timing does not depend on the weights). Peak GPU memory is
#    torch.cuda.max_memory_allocated per row.
# 2. Evaluation (Recall@1,10,100,1000 + MAP@R, cosine, leave-one-out) at N x 128 with N = 1,000,000 on the GPU,
#    with dmlkd's torch kNN and, if faiss has GPU support, backend="faiss". With EVAL_QUERIES < N only that many
#    queries are searched against all N and the time is scaled by N / EVAL_QUERIES (marked "est.").
#
# Usage: bash bench/gpu_check.sh            (env: PYTHON, BATCH=90, STEPS=20, WARMUP=5, WORKERS=8,
#                                             EVAL_N=1000000, EVAL_QUERIES=EVAL_N, WORK=/tmp/dmlkd-gpu-check)
# Exits with status 2 and a one-line message when torch sees no CUDA device.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export BATCH="${BATCH:-90}" STEPS="${STEPS:-20}" WARMUP="${WARMUP:-5}" WORKERS="${WORKERS:-8}"
export EVAL_N="${EVAL_N:-1000000}" WORK="${WORK:-/tmp/dmlkd-gpu-check}"
export EVAL_QUERIES="${EVAL_QUERIES:-$EVAL_N}"

# The repository root is the package: make `import dmlkd` work without an install.
if ! "$PYTHON" -c "import dmlkd" 2>/dev/null; then
    shim="$(mktemp -d)"
    ln -s "$REPO" "$shim/dmlkd"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PYTHON" - <<'EOF'
import sys

try:
    import torch
except ImportError:
    print(f"gpu_check: torch is not importable with {sys.executable}; set PYTHON=/path/to/python", file=sys.stderr)
    sys.exit(2)
if not torch.cuda.is_available():
    print(
        f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
        "run this script on a machine with an NVIDIA GPU",
        file=sys.stderr,
    )
    sys.exit(2)
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
then
    exit 2
fi
mkdir -p "$WORK"
start=$SECONDS

echo "== training step, 224 px, bf16 autocast, batch ${BATCH} images x 2 views =="
"$PYTHON" - <<'EOF'
import copy
import os
import time
from pathlib import Path

import torch

from dmlkd.checkpoints import save_checkpoint
from dmlkd.config import apply_overrides, from_dict
from dmlkd.data.catalog import build_splits
from dmlkd.data.transforms import ReplaySpec
from dmlkd.data.training import build_train_data
from dmlkd.engine.optim import build_optimizer
from dmlkd.models import build_model, create_model
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.config import TransferConfig, start_tree
from dmlkd.transfer.trainer import TransferModule, build_method, build_teacher_source, load_teacher, param_groups

device = torch.device("cuda")
work = Path(os.environ["WORK"])
batch, steps, warmup = int(os.environ["BATCH"]), int(os.environ["STEPS"]), int(os.environ["WARMUP"])
teacher_dir = work / "teacher-r50-512"
if not (teacher_dir / "config.json").is_file():
    torch.manual_seed(0)
    save_checkpoint(teacher_dir, create_model("resnet50-512"), provenance={"note": "random init, gpu_check"})
items = [
    f"teacher.ref={teacher_dir}", f"teacher.cache_dir={work / 'cache'}", "teacher.cache_views=1",
    "student.arch=resnet18", "student.embedding_dim=128", f"train.batch_size={batch}", "train.ipc=2",
    "train.views=2", "train.image_size=224", "train.progress=false", "train.device=cuda",
    f"train.num_workers={os.environ['WORKERS']}",
]
config = from_dict(TransferConfig, apply_overrides(start_tree("demo-glyphs", "glyphs"), items))
splits, _bad = build_splits(config.data)

data = build_train_data(splits, config.train, replay=ReplaySpec(config.teacher.cache_views, config.train.seed))
batches, epoch = [], 0
while len(batches) < warmup + steps:
    for item in data.loader_factory(epoch, 0):
        batches.append(item)
        if len(batches) == warmup + steps:
            break
    epoch += 1
batches = [(b._replace(images=b.images.to(device), labels=b.labels.to(device), indices=b.indices.to(device)),
            k.to(device)) for b, k in batches]


class Alone(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, replay_k):
        return {"loss": self.model(batch.images).embedding.float().pow(2).mean()}


def alone(spec):
    model = create_model(spec).to(device)
    groups = [("backbone", list(model.backbone.parameters()), 1.0), ("head", list(model.embedding.parameters()), 1.0)]
    return Alone(model), build_optimizer(groups, config.optim)


def transfer(mode):
    torch.manual_seed(0)
    teacher, _record, digest = load_teacher(config.teacher.ref)
    teacher = teacher.to(device)  # the cache build does not move the teacher itself (see docs/benchmarks.md)
    student = build_model(config.student).to(device)
    num_classes = len(set(int(label) for label in splits.train.labels))
    method = build_method(config, student, teacher, splits, num_classes)
    source = build_teacher_source(config, teacher, digest, splits, TRANSFER_METHODS.get(config.method.name),
                                  mode, device)
    module = TransferModule(student, method, source).to(device)
    return module, build_optimizer(param_groups(module, config), config.optim)


def run(name, build):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    module, optimizer = build()
    module.train()
    for index, (item, replay_k) in enumerate(batches):
        if index == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module(item, replay_k)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    rows = item.images.shape[0]
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"| {name} | {seconds * 1e3:.1f} | {rows / seconds:,.0f} | {rows // 2 / seconds:,.0f} | {peak:.2f} |",
          flush=True)
    del module, optimizer


print("| step | ms / step | views/s | images/s | peak GPU memory (GiB) |")
print("|---|---:|---:|---:|---:|")
run("resnet18-128 alone", lambda: alone("resnet18-128"))
run("resnet50-512 alone", lambda: alone("resnet50-512"))
run("r18-128 <- r50-512, cached teacher", lambda: transfer("cached"))
run("r18-128 <- r50-512, online teacher", lambda: transfer("online"))
EOF
echo "(training part: $((SECONDS - start)) s)"

echo
echo "== evaluation, N=${EVAL_N} x 128, R@1,10,100,1000 + MAP@R, cosine, leave-one-out =="
"$PYTHON" - <<'EOF'
import os
import time

import torch

from dmlkd.evaluation import retrieval_metrics
from dmlkd.evaluation.knn import chunk_rows

device = torch.device("cuda")
num, queries = int(os.environ["EVAL_N"]), min(int(os.environ["EVAL_N"]), int(os.environ["EVAL_QUERIES"]))
generator = torch.Generator(device=device).manual_seed(0)
sizes = torch.randint(2, 9, (num // 2 + 1,), generator=generator, device=device)
labels = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)[:num]
centres = torch.randn(int(labels.max()) + 1, 128, generator=generator, device=device)
embeddings = centres[labels] + 2.5 * torch.randn(num, 128, generator=generator, device=device)
del centres

backends = ["torch"]
try:
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        backends.append("faiss")
    else:
        print("faiss-gpu: n/a (faiss is installed without GPU support)")
except ImportError:
    print("faiss-gpu: n/a (faiss is not installed)")

print(f"torch chunk: {chunk_rows(num, 1000)} query rows per 1 GiB budget")
print("| backend | queries | time (s) | peak GPU memory (GiB) | R@1 | MAP@R |")
print("|---|---:|---:|---:|---:|---:|")
for backend in backends:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gallery = {} if queries == num else {"gallery": embeddings, "gallery_labels": labels}
    started = time.perf_counter()
    recall, map_r = retrieval_metrics(embeddings[:queries], labels[:queries], (1, 10, 100, 1000), "cosine",
                                      backend=backend, **gallery)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) * num / queries
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    est = "" if queries == num else " (est.)"
    metrics = f"{100 * recall[1]:.2f} | {100 * map_r:.2f}" if queries == num else "n/a | n/a"
    print(f"| {backend} | {queries:,} | {seconds:.1f}{est} | {peak:.2f} | {metrics} |", flush=True)
EOF
echo "(total: $((SECONDS - start)) s)"
