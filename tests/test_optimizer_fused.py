"""build_optimizer uses torch's fused kernels on CPU: the same update as the per-parameter loop to float
rounding, and a resumed state keeps them."""

from __future__ import annotations

import pytest
import torch

from dmlkd.config import OptimConfig
from dmlkd.engine.optim import build_optimizer

CONFIGS = {
    "adamw": OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=1e-4),
    "adam": OptimConfig(optimizer="adam", lr=1e-2, weight_decay=1e-4),
    "sgd": OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
}


def _run(config: OptimConfig, fused: bool) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(7, 5), (5,), (3, 2, 2)]]
    optimizer = build_optimizer([("backbone", params[:2], 1.0), ("head", params[2:], 10.0)], config)
    if not fused:
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = None, False
    for step in range(5):
        for param in params:  # a gradient that depends on the parameters, as a real loss gives
            param.grad = torch.sin(param.detach() * (step + 1)) + 0.1
        optimizer.step()
    return optimizer, [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_on_cpu_equals_the_loop(name: str) -> None:
    fused, fused_params = _run(CONFIGS[name], fused=True)
    assert all(group["fused"] for group in fused.param_groups)
    _, loop_params = _run(CONFIGS[name], fused=False)
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_state_round_trips() -> None:
    optimizer, _ = _run(CONFIGS["adamw"], fused=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    again = build_optimizer([("backbone", params[:2], 1.0), ("head", params[2:], 10.0)], CONFIGS["adamw"])
    again.load_state_dict(optimizer.state_dict())
    assert all(group["fused"] for group in again.param_groups)
    assert [group["lr"] for group in again.param_groups] == [1e-2, 1e-1]


def test_the_training_device_decides() -> None:
    """Built before the model moves (the loop prepares it afterwards): the training device decides."""
    params = [torch.nn.Parameter(torch.ones(3))]
    assert build_optimizer([("all", params, 1.0)], CONFIGS["adamw"], "cpu").param_groups[0]["fused"]
    assert not build_optimizer([("all", params, 1.0)], CONFIGS["adamw"], "mps").param_groups[0]["fused"]
