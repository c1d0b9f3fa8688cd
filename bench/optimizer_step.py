"""What the fused optimiser kernels buy: one ``step()`` of the optimisers ``build_optimizer`` makes, fused
(what dmlkd uses on CPU and CUDA) against torch's per-parameter loop, side by side in one run.

Usage:
    python bench/optimizer_step.py [--model resnet18-128] [--steps 20] [--threads 1] [--device cpu]

For each optimiser (AdamW, Adam, SGD with Nesterov momentum) and each implementation it runs ``--steps``
steps on the model's parameters with the same gradients and prints the median milliseconds per step, the
loop/fused ratio and the largest parameter difference between the two after the last step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from dmlkd.config import OptimConfig
from dmlkd.engine.optim import build_optimizer
from dmlkd.models import create_model


def _steps(model: torch.nn.Module, config: OptimConfig, fused: bool, steps: int, device: torch.device):
    model = copy.deepcopy(model).to(device)
    params = list(model.parameters())
    optimizer = build_optimizer([("all", params, 1.0)], config)
    if not fused:  # the per-parameter loop torch uses when neither fused nor foreach is asked for
        for group in optimizer.param_groups:
            group["fused"] = None
            group["foreach"] = False
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(p.shape, generator=generator).to(device) for p in params]
    times = []
    for index in range(steps):
        for param, gradient in zip(params, gradients):
            param.grad = gradient * (1 + 0.1 * index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return params, statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18-128")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = create_model(args.model)
    count = sum(p.numel() for p in model.parameters())
    print(f"{args.model} ({count:,} parameters), {device}, {args.threads} thread(s)")
    print("| optimiser | loop ms/step | fused ms/step | loop / fused | max |param difference| |")
    print("|---|---:|---:|---:|---:|")
    for name, config in (
        ("adamw", OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4)),
        ("adam", OptimConfig(optimizer="adam", lr=1e-3, weight_decay=1e-4)),
        ("sgd", OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)),
    ):
        loop_params, loop_time = _steps(model, config, False, args.steps, device)
        fused_params, fused_time = _steps(model, config, True, args.steps, device)
        difference = max((a - b).abs().max().item() for a, b in zip(loop_params, fused_params))
        print(
            f"| {name} | {loop_time * 1000:.1f} | {fused_time * 1000:.1f} | {loop_time / fused_time:.2f} "
            f"| {difference:.1e} |"
        )


if __name__ == "__main__":
    main()
