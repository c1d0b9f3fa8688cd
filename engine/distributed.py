"""Several processes (GPUs, or CPU processes with gloo) that train as one: the global-batch contract.

A launcher (``torchrun``, ``accelerate launch``) starts N copies of the same command. ``init_processes``
joins them into one process group (through Accelerate's ``PartialState``, which ``fit``'s ``Accelerator``
then reuses); without a launcher it is a single process and every helper here is a no-op.

The *global* batch (P classes x K images x V views) is sampled identically by every process, which keeps a
contiguous ``B/N`` slice of it (``dmlkd.data.samplers``). Locally the V views are view-major over the local
slice; :func:`gather_view_major` gathers the slices and reorders the rows into the global view-major layout
(row ``i + v * B``), so a loss sees *exactly* the single-process batch, in the same order.

Gradients (:func:`gather_rows` with ``with_grad=True``): every process computes the same loss ``L`` on the
gathered batch. The backward of the gather sums the incoming gradients over processes (all-reduce) and keeps
the local rows, so each process's rows get ``N * dL/drows``; DDP then averages parameter gradients over the
N processes, which leaves ``dL/dθ``: N processes x B/N give the gradient of 1 process x B. Loss parameters
(proxies, CRD heads) see the same ``dL/dp`` on every process and average to it. Per-sample terms computed on
local rows only (FitNet/AT feature maps: means over the batch) average to the global mean the same way.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dmlkd.data.batch import Batch
from dmlkd.devices import resolve_device
from dmlkd.errors import ConfigError
from dmlkd.models.outputs import ModelOutput

T = TypeVar("T")

# Long enough for the main process to compute retrieval metrics or write a cache while the others wait.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: ``rank`` of ``world_size`` and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_processes(device_name: str = "auto") -> ProcessInfo:
    """Join the launcher's process group (idempotent); a single process without a launcher.

    ``device_name`` is ``TrainConfig.device``: ``cpu`` (or ``auto`` without CUDA) uses gloo, otherwise each
    process takes the GPU of its local rank and NCCL.
    """
    from accelerate import PartialState

    cpu = resolve_device(device_name).type == "cpu"
    kwargs: dict[str, Any] = {}
    if launched() and not dist.is_initialized():
        kwargs["timeout"] = PROCESS_GROUP_TIMEOUT
    state = PartialState(cpu=cpu, **kwargs)
    return ProcessInfo(state.process_index, state.num_processes, state.device)


def world_size_of_launch() -> int:
    """The number of processes a launcher started (1 without one), known before the process group exists."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def comm_device(tensor: Tensor | None = None) -> torch.device:
    """The device collectives run on: the current GPU under NCCL, else the tensor's device (or CPU)."""
    if world_size() > 1 and "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device if tensor is not None else torch.device("cpu")


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (equal row counts); backward: sum over processes, keep the local rows."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(tensor: Tensor, with_grad: bool = False) -> Tensor:
    """``(N * b, ...)`` rows of every process in rank order; identity in a single process.

    Args:
        tensor: ``(b, ...)`` local rows, the same ``b`` on every process.
        with_grad: keep the autograd graph: the local rows receive the sum over processes of the gradient
            of their gathered copies (see the module docstring); otherwise the result is detached.
    """
    if world_size() == 1:
        return tensor if with_grad else tensor.detach()
    if with_grad and tensor.requires_grad:
        return _GatherRows.apply(tensor)
    with torch.no_grad():
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.detach().contiguous())
        return torch.cat(parts)


def view_major(gathered: Tensor, views: int, processes: int) -> Tensor:
    """Reorder rows ``[process p][view v][i]`` into the global view-major ``[view v][process p][i]``."""
    if processes == 1 or views == 1:
        return gathered
    local = gathered.shape[0] // (processes * views)
    blocks = gathered.reshape(processes, views, local, *gathered.shape[1:])
    return blocks.transpose(0, 1).reshape(gathered.shape)


def gather_view_major(tensor: Tensor, views: int, with_grad: bool = False) -> Tensor:
    """The global batch's rows of a view-major local tensor, in single-process order."""
    return view_major(gather_rows(tensor, with_grad), views, world_size())


def gather_batch(batch: Batch, views: int) -> Batch:
    """The global batch's labels and indices (view-major); ``images`` stay local (losses never read them)."""
    if world_size() == 1:
        return batch
    return Batch(batch.images, gather_view_major(batch.labels, views), gather_view_major(batch.indices, views))


def gather_output(output: ModelOutput, views: int, with_grad: bool) -> ModelOutput:
    """Gather ``embedding`` and ``pooled`` over processes (global view-major rows); ``features`` stay local.

    Feature maps are large and only enter per-sample terms (FitNet, AT) whose batch means average over
    processes to the global mean, so they are not gathered.
    """
    if world_size() == 1:
        return output
    pooled = None if output.pooled is None else gather_view_major(output.pooled, views, with_grad)
    embedding = gather_view_major(output.embedding, views, with_grad)
    return ModelOutput(embedding=embedding, pooled=pooled, features=output.features)  # type: ignore[arg-type]


def gather_uneven(tensor: Tensor) -> list[Tensor]:
    """Every process's ``(n_p, ...)`` rows (``n_p`` may differ), in rank order, on ``tensor``'s device.

    Rows are padded to the largest ``n_p`` for the collective and trimmed again, so no padding survives.
    """
    if world_size() == 1:
        return [tensor]
    device = comm_device(tensor)
    count = torch.tensor([tensor.shape[0]], device=device)
    counts = [torch.empty_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:size].to(tensor.device) for part, size in zip(parts, sizes)]


def shard_batches(num_items: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Rank ``rank``'s batches of ``range(num_items)`` cut into ``batch_size`` chunks, dealt round-robin.

    Every batch is the one a single process would form, so per-sample outputs of batch-independent models
    (eval mode) are bitwise the single-process ones on the same hardware.
    """
    starts = range(0, num_items, batch_size)
    return [list(range(s, min(s + batch_size, num_items))) for j, s in enumerate(starts) if j % world == rank]


def any_true(*flags: bool, device: torch.device | None = None) -> tuple[bool, ...]:
    """Each flag OR-ed over processes (one small all-reduce), so every process takes the same branch."""
    if world_size() == 1:
        return tuple(bool(flag) for flag in flags)
    values = torch.tensor([float(flag) for flag in flags], device=device or comm_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in values.tolist())


def broadcast_object(value: T, src: int = 0) -> T:
    """``value`` of process ``src`` on every process (pickled; small objects only)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def call_on_main(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``function`` on the main process only and return its result on every process.

    An exception on the main process is re-raised on every process (the others get a ``RuntimeError``
    unless the exception pickles), so no process is left waiting.
    """
    result: Any = None
    error: BaseException | None = None
    shared: BaseException | None = None
    if is_main():
        try:
            result = function(*args, **kwargs)
        except Exception as caught:  # re-raised below on every process
            error = shared = caught
            try:
                pickle.dumps(caught)
            except Exception:  # an exception that does not pickle travels as text
                shared = RuntimeError(f"{type(caught).__name__}: {caught}")
    outcome = broadcast_object((result, shared))
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``module`` (BN running statistics, memory banks) from process ``src``."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm in ``module`` by ``SyncBatchNorm`` (statistics over the global batch).

    The parameters are reused, so optimiser groups built earlier stay valid. Needs CUDA (NCCL); on CPU
    processes BN statistics stay per process.
    """
    if world_size() == 1:
        return module
    if device.type != "cuda":
        raise ConfigError(
            f"train.sync_bn=true needs CUDA GPUs, but the processes run on {device.type}; set "
            "train.sync_bn=false (BatchNorm statistics are then per process)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
