"""Embedding-transfer methods see the teacher as the reference feeds it: L2-normalised embeddings whatever the
teacher's ``l2_norm`` (seed-spec §1.4, §2.14), and CRD gives the views of one image one index and one set of
negatives (§2.9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dmlkd.transfer.methods  # noqa: F401  (registers the methods)
from dmlkd.data.batch import Batch
from dmlkd.models import create_model
from dmlkd.models.outputs import ModelOutput
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.base import ModelInfo, TransferContext

VIEWS, IMAGES, NUM_TRAIN, NUM_CLASSES = 2, 6, 20, 3
LABELS = torch.arange(NUM_TRAIN) % NUM_CLASSES
EMBEDDING_METHODS = [name for name in TRANSFER_METHODS.names() if not TRANSFER_METHODS.get(name).needs_features]


def _build(name: str, student: ModelInfo, teacher: ModelInfo, **options):
    method = TRANSFER_METHODS.build(name, TransferContext(student, teacher, NUM_CLASSES, NUM_TRAIN, VIEWS), **options)
    method.set_train_labels(LABELS)
    return method


def _batch() -> Batch:
    indices = torch.tensor([3, 7, 11, 0, 14, 5]).repeat(VIEWS)  # view-major
    return Batch(images=torch.empty(0), labels=LABELS[indices], indices=indices)


@pytest.fixture(scope="module")
def unnormalised_teacher() -> tuple[ModelInfo, torch.Tensor, torch.Tensor]:
    """A teacher built with ``l2_norm=False`` (the PaddlePaddle recipes) and its raw outputs on a batch."""
    torch.manual_seed(0)
    model = create_model("resnet18-16", l2_norm=False).eval()
    with torch.no_grad():
        output = model(torch.rand(VIEWS * IMAGES, 3, 32, 32))
    norms = output.embedding.norm(dim=1)
    assert (norms - 1).abs().min() > 0.05 and norms.std() > 0.01  # raw rows of unequal norms
    return ModelInfo.from_model(model), output.embedding, output.pooled


@pytest.mark.parametrize("name", EMBEDDING_METHODS)
def test_methods_see_the_normalised_teacher_whatever_its_l2_norm(name, unnormalised_teacher):
    teacher_info, raw, pooled = unnormalised_teacher
    student_info = ModelInfo(embedding_dim=8, pooled_dim=pooled.shape[1], tap_channels=(4,), arch="tiny")
    options = {"nce_k": 16} if name == "crd" else {}
    torch.manual_seed(1)
    student = ModelOutput(embedding=torch.randn(VIEWS * IMAGES, 8), pooled=torch.randn(VIEWS * IMAGES, pooled.shape[1]))
    results = []
    for teacher_embedding in (raw, F.normalize(raw, dim=1)):
        torch.manual_seed(2)
        method = _build(name, student_info, teacher_info, **options).eval()
        terms = method(student, ModelOutput(embedding=teacher_embedding, pooled=pooled), _batch())
        results.append({key: float(value.detach()) for key, value in terms.items()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-7), key


def test_crd_views_of_an_image_share_index_and_negatives():
    student_info = ModelInfo(embedding_dim=8, pooled_dim=12, tap_channels=(4,), arch="tiny")
    teacher_info = ModelInfo(embedding_dim=16, pooled_dim=20, tap_channels=(4,), arch="tiny")
    method = _build("crd", student_info, teacher_info, nce_k=32)
    seen = []
    original = method._scores

    def recording(memory, features, contrast):
        seen.append(contrast.clone())
        return original(memory, features, contrast)

    method._scores = recording
    rows = VIEWS * IMAGES
    student = ModelOutput(embedding=torch.randn(rows, 8), pooled=torch.randn(rows, 12))
    teacher = ModelOutput(embedding=torch.randn(rows, 16), pooled=torch.randn(rows, 20))
    method(student, teacher, _batch())
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    contrast = seen[0]
    assert torch.equal(contrast[:, 0], _batch().indices)  # the positive is the row's own image
    assert torch.equal(contrast[:IMAGES], contrast[IMAGES:])  # view 1 of image i has view 0's negatives
    assert not torch.equal(contrast[0, 1:], contrast[1, 1:])  # different images draw different negatives
    negatives_labels = LABELS[contrast[:, 1:]]
    assert bool((negatives_labels != _batch().labels.unsqueeze(1)).all())  # label-aware, as before
