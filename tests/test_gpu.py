"""GPU smoke tests: one bf16 transfer step on CUDA, and a faiss-gpu kNN search (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from dmlkd.data.batch import Batch
from dmlkd.evaluation import knn
from dmlkd.models import create_model
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.base import ModelInfo, TransferContext
from dmlkd.transfer.teacher_source import TeacherSource
from dmlkd.transfer.trainer import TransferModule

NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def _faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def test_bf16_transfer_step_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    student = create_model("resnet18-16").to(device)
    teacher = create_model("resnet18-32").to(device).eval().requires_grad_(False)
    images_per_view, views = 4, 2
    context = TransferContext(
        student=ModelInfo.from_model(student),
        teacher=ModelInfo.from_model(teacher),
        num_classes=2,
        num_train=images_per_view,
        num_views=views,
    )
    method = TRANSFER_METHODS.build("relaxed_contrastive", context)
    method.set_train_labels(torch.tensor([0, 0, 1, 1]))
    module = TransferModule(student, method, TeacherSource("online", model=teacher)).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    labels = torch.tensor([0, 0, 1, 1], device=device).repeat(views)
    indices = torch.arange(images_per_view, device=device).repeat(views)
    batch = Batch(torch.rand(images_per_view * views, 3, 32, 32, device=device), labels, indices)
    before = [p.detach().clone() for p in student.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module(batch, torch.full((images_per_view * views,), -1, device=device))["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


@pytest.mark.skipif(not _faiss_has_gpu(), reason="faiss is not installed with GPU support")
def test_faiss_gpu_search_matches_torch():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(500, 32, generator=generator).cuda()
    _scores, torch_indices = knn(embeddings, None, k=5, backend="torch")
    faiss_scores, faiss_indices = knn(embeddings, None, k=5, backend="faiss")
    assert faiss_indices.device.type == "cuda"
    assert torch.equal(faiss_indices, torch_indices)
    assert torch.isfinite(faiss_scores).all()
