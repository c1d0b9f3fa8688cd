"""Tests of the transfer methods (dmlkd.transfer.methods): contract, parity with functional, PML, CRD."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

import dmlkd.transfer.methods  # noqa: F401  (registers the methods)
from dmlkd.data.batch import Batch
from dmlkd.errors import ConfigError, DataError
from dmlkd.models.outputs import ModelOutput
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.teacher.losses.proxy_anchor import ProxyAnchorLoss
from dmlkd.transfer import functional
from dmlkd.transfer.base import ModelInfo, TransferContext
from dmlkd.transfer.methods.crd import CRD, momentum_update
from dmlkd.transfer.methods.darkrank import batch_all_triplet
from dmlkd.transfer.taps import TAP_STRIDES

STUDENT = ModelInfo(embedding_dim=8, pooled_dim=12, tap_channels=(4, 6), arch="tiny_student")
TEACHER = ModelInfo(embedding_dim=16, pooled_dim=20, tap_channels=(5, 7), arch="tiny_teacher")
NUM_CLASSES, NUM_TRAIN, NUM_VIEWS, IMAGES = 3, 20, 2, 6
TRAIN_LABELS = torch.arange(NUM_TRAIN) % NUM_CLASSES
# The names saved configs refer to: a built-in may be added, never renamed.
SAVED_METHOD_NAMES = {
    "attention", "crd", "darkrank", "fitnet", "pkt", "relaxed_contrastive", "relaxed_ms", "rkd"
}  # fmt: skip


def _build(name: str, student: ModelInfo = STUDENT, teacher: ModelInfo = TEACHER, **options):
    context = TransferContext(student, teacher, NUM_CLASSES, NUM_TRAIN, NUM_VIEWS)
    method = TRANSFER_METHODS.build(name, context, **options)
    method.set_train_labels(TRAIN_LABELS)
    return method


def _batch(seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(NUM_TRAIN, generator=generator)[:IMAGES].repeat(NUM_VIEWS)  # view-major
    return Batch(images=torch.empty(0), labels=TRAIN_LABELS[indices], indices=indices)


def _output(info: ModelInfo, seed: int, features: bool, pooled: bool = True, unit: bool = False):
    generator = torch.Generator().manual_seed(seed)
    n = IMAGES * NUM_VIEWS
    embedding = torch.randn(n, info.embedding_dim, generator=generator)
    if unit:
        embedding = F.normalize(embedding, dim=1)
    maps = None
    if features:
        sizes = (4, 2)  # the same spatial sizes on both sides
        maps = tuple(torch.randn(n, c, s, s, generator=generator) for c, s in zip(info.tap_channels, sizes))
        maps = tuple(m.requires_grad_() for m in maps)
    pooled_tensor = torch.randn(n, info.pooled_dim, generator=generator).requires_grad_() if pooled else None
    return ModelOutput(embedding=embedding.requires_grad_(), pooled=pooled_tensor, features=maps)


def _tensors(output: ModelOutput) -> list[torch.Tensor]:
    return [t for t in (output.embedding, output.pooled, *(output.features or ())) if t is not None]


def _outputs(method, seed: int = 0):
    student = _output(STUDENT, seed, features=method.needs_features)
    teacher = _output(TEACHER, seed + 1, features=method.needs_features, pooled=method.needs_pooled, unit=True)
    return student, teacher


# ---------------------------------------------------------------------------------------------------------
# Registry-wide contract.


def test_the_saved_method_names_stay_registered():
    assert SAVED_METHOD_NAMES <= set(TRANSFER_METHODS.names())


def check_method_contract(name: str) -> None:
    """What every transfer method must do, built from its option defaults; raises AssertionError otherwise."""
    torch.manual_seed(0)
    method = _build(name)
    student, teacher = _outputs(method)
    terms = method(student, teacher, _batch())
    assert terms and all(isinstance(key, str) for key in terms)
    for key, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    sum(terms.values()).backward()
    assert student.embedding.grad is not None and student.embedding.grad.abs().sum() > 0
    if method.needs_features:
        assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student.features)
    if method.needs_pooled:
        assert student.pooled.grad is not None and student.pooled.grad.abs().sum() > 0
    assert all(t.grad is None for t in _tensors(teacher)), "gradient reached the teacher"
    for parameter_name, parameter in method.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
    with pytest.raises(ConfigError, match=f"unknown option 'no_such_option' for transfer method '{name}'"):
        _build(name, no_such_option=1)


@pytest.mark.parametrize("name", TRANSFER_METHODS.names())
def test_contract(name):
    check_method_contract(name)


THROWAWAY_METHOD = """
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer import functional
from dmlkd.transfer.base import TransferContext, TransferMethod


@TRANSFER_METHODS.register("throwaway_distance")
class ThrowawayDistance(TransferMethod):
    def __init__(self, context: TransferContext, weight: float = 1.0) -> None:
        super().__init__(context)
        self.weight = weight

    def forward(self, student, teacher, batch):
        return {"distance": self.weight * functional.rkd_distance(student.embedding, teacher.embedding)}
"""


def test_a_method_in_one_new_file_with_one_decorator_is_picked_up(tmp_path, monkeypatch):
    import sys

    import dmlkd.transfer.methods as package
    from dmlkd.registry import import_submodules

    (tmp_path / "throwaway_distance.py").write_text(THROWAWAY_METHOD)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    try:
        import_submodules(package.__name__, package.__path__)  # what importing the package does
        assert TRANSFER_METHODS.options("throwaway_distance") == {"weight": 1.0}
        check_method_contract("throwaway_distance")
        with pytest.raises(ConfigError, match="'throwaway_distance' option weight: expected a number, got 'x'"):
            _build("throwaway_distance", weight="x")
    finally:
        TRANSFER_METHODS.unregister("throwaway_distance")
        sys.modules.pop(f"{package.__name__}.throwaway_distance", None)


@pytest.mark.parametrize("name", [n for n in TRANSFER_METHODS.names() if not TRANSFER_METHODS.get(n).uses_labels])
def test_label_free_methods_ignore_labels(name):
    method = _build(name)
    student, teacher = _outputs(method)
    batch = _batch()
    first = method(student, teacher, batch)
    second = method(student, teacher, batch._replace(labels=torch.full_like(batch.labels, -7)))
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name", TRANSFER_METHODS.names())
def test_parameter_groups_partition_the_trainable_parameters(name):
    method = _build(name)
    groups = method.parameter_groups()
    seen = [id(p) for _, params, _ in groups for p in params]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in method.parameters() if p.requires_grad}
    assert all(params for _, params, _ in groups), "empty groups are left out"
    for group_name, params, multiplier in groups:
        proxy = any(isinstance(m, ProxyAnchorLoss) and p is m.proxies for m in method.modules() for p in params)
        assert (group_name == "proxies") == proxy
        assert multiplier == (ProxyAnchorLoss.lr_multiplier if proxy else 1.0)
    if name in {"fitnet", "attention", "crd"}:
        assert dict((g, m) for g, _, m in groups)["proxies"] == 100.0


@pytest.mark.parametrize("name", TRANSFER_METHODS.names())
def test_options_are_validated(name):
    with pytest.raises(ConfigError, match="unknown option 'no_such_option'"):
        _build(name, no_such_option=1)
    options = TRANSFER_METHODS.options(name)
    weight_name = next(key for key in options if key.endswith("weight") or key == "beta")
    with pytest.raises(ConfigError, match=weight_name):
        _build(name, **{weight_name: -1.0})


@pytest.mark.parametrize("field", ["num_classes", "num_train", "num_views"])
def test_transfer_context_counts_are_checked_once(field):
    counts = {"num_classes": NUM_CLASSES, "num_train": NUM_TRAIN, "num_views": NUM_VIEWS, field: 0}
    with pytest.raises(ConfigError, match=f"^{field} must be an integer >= 1, got 0$"):
        TransferContext(STUDENT, TEACHER, **counts)


def test_model_info_from_model():
    model = types.SimpleNamespace(
        embedding_dim=128,
        pooled_dim=512,
        tap_channels=[64, 128],
        config=types.SimpleNamespace(arch="resnet18"),
    )
    assert ModelInfo.from_model(model) == ModelInfo(128, 512, (64, 128), "resnet18")


# ---------------------------------------------------------------------------------------------------------
# Label-free methods are their functional call times the weight.

LABEL_FREE = [
    ("relaxed_contrastive", {"sigma": 0.7, "delta": 1.3, "weight": 0.5},
     lambda s, t: {"relaxed_contrastive": 0.5 * functional.relaxed_contrastive(s, t, sigma=0.7, delta=1.3)}),
    ("relaxed_ms", {"sigma": 0.7, "delta": 1.3, "alpha": 1.5, "beta": 2.5, "weight": 0.5},
     lambda s, t: {"relaxed_ms": 0.5 * functional.relaxed_ms(s, t, NUM_VIEWS, 0.7, 1.3, 1.5, 2.5)}),
    ("rkd", {"distance_weight": 0.5, "angle_weight": 3.0},
     lambda s, t: {"rkd_distance": 0.5 * functional.rkd_distance(s, t),
                   "rkd_angle": 3.0 * functional.rkd_angle(s, t)}),
    ("pkt", {"weight": 0.5}, lambda s, t: {"pkt": 0.5 * functional.pkt(s, t)}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "options", "expected"), LABEL_FREE, ids=[row[0] for row in LABEL_FREE])
def test_label_free_method_equals_functional(name, options, expected):
    method = _build(name, **options)
    student, teacher = _outputs(method)
    terms = method(student, teacher, _batch())
    reference = expected(student.embedding, teacher.embedding)
    assert terms.keys() == reference.keys()
    for key in terms:
        torch.testing.assert_close(terms[key], reference[key], rtol=0, atol=0)


def test_default_weights_follow_the_reference():
    assert TRANSFER_METHODS.options("rkd") == {"distance_weight": 1.0, "angle_weight": 2.0}
    assert TRANSFER_METHODS.options("relaxed_ms") == {
        "sigma": 1.0, "delta": 1.0, "alpha": 1.0, "beta": 2.0, "weight": 1.0
    }  # fmt: skip
    darkrank = TRANSFER_METHODS.options("darkrank")
    assert (darkrank["alpha"], darkrank["beta"], darkrank["list_length"]) == (3.0, 3.0, 4)
    assert (darkrank["weight"], darkrank["triplet_weight"], darkrank["triplet_margin"]) == (1.0, 1.0, 0.2)
    crd = TRANSFER_METHODS.options("crd")
    assert (crd["feature_dim"], crd["nce_k"], crd["nce_t"], crd["momentum"]) == (128, 4096, 0.07, 0.5)


# ---------------------------------------------------------------------------------------------------------
# DarkRank: ranking term from functional, triplet term against pytorch-metric-learning.


def test_darkrank_terms():
    method = _build("darkrank", weight=0.5, triplet_weight=2.0)
    student, teacher = _outputs(method)
    batch = _batch()
    terms = method(student, teacher, batch)
    torch.testing.assert_close(terms["dark_rank"], 0.5 * functional.dark_rank(student.embedding, teacher.embedding))
    torch.testing.assert_close(terms["triplet"], 2.0 * batch_all_triplet(student.embedding, batch.labels, 0.2))


@pytest.mark.parametrize("seed", range(4))
def test_triplet_term_matches_pml(seed):
    # PML's TripletMarginLoss: LpDistance(normalize_embeddings=True, p=2), every (a, p, n) without a miner,
    # AvgNonZeroReducer (mean over losses > 0). The reference's miner keeps triplets with loss >= 0, which
    # the reducer then filters the same way.
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    from pytorch_metric_learning.reducers import AvgNonZeroReducer

    oracle = pml_losses.TripletMarginLoss(margin=0.2)
    assert isinstance(oracle.reducer, AvgNonZeroReducer) and oracle.distance.normalize_embeddings
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (16,), generator=generator)
    embeddings = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    ours_input = embeddings.clone().requires_grad_()
    pml_input = embeddings.clone().requires_grad_()
    ours = batch_all_triplet(ours_input, labels, margin=0.2)
    expected = oracle(pml_input, labels)
    torch.testing.assert_close(ours, expected)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(ours_input.grad, pml_input.grad)


def test_triplet_term_is_zero_without_violations():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = batch_all_triplet(embeddings, labels)
    assert loss.item() == 0.0 == pml_losses.TripletMarginLoss(margin=0.2)(embeddings, labels).item()
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_triplet_term_by_loop():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    unit = F.normalize(embeddings, dim=1)
    losses = []
    for a in range(7):
        for p in range(7):
            for n in range(7):
                if a != p and labels[a] == labels[p] and labels[n] != labels[a]:
                    value = (unit[a] - unit[p]).norm() - (unit[a] - unit[n]).norm() + 0.2
                    losses.append(max(value.item(), 0.0))
    active = [v for v in losses if v > 0]
    assert batch_all_triplet(embeddings, labels).item() == pytest.approx(sum(active) / len(active), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Feature methods.

RESNET18 = ModelInfo(128, 512, (64, 128, 256, 512), "resnet18")
RESNET50 = ModelInfo(512, 2048, (256, 512, 1024, 2048), "resnet50")
BN_INCEPTION = ModelInfo(512, 1024, (576, 1056, 1024), "bn_inception")
GOOGLENET = ModelInfo(512, 1024, (480, 832, 1024), "googlenet")


def test_fitnet_regressors_map_resnet18_to_resnet50():
    method = _build("fitnet", student=RESNET18, teacher=RESNET50)
    shapes = [(r.in_channels, r.out_channels, r.kernel_size, r.bias) for r in method.regressors]
    assert shapes == [(64, 256, (1, 1), None), (128, 512, (1, 1), None), (256, 1024, (1, 1), None),
                      (512, 2048, (1, 1), None)]  # fmt: skip
    weights = torch.cat([r.weight.detach().flatten() for r in method.regressors])
    assert weights.abs().max() <= 0.005 and weights.abs().max() > 0.004  # uniform over the whole range
    assert weights.std() == pytest.approx(0.005 / math.sqrt(3), rel=0.05)


@pytest.mark.parametrize("name", ["fitnet", "attention"])
@pytest.mark.parametrize(("student", "teacher"), [(RESNET18, BN_INCEPTION), (GOOGLENET, BN_INCEPTION)])
def test_feature_methods_reject_pairs_whose_taps_differ(name, student, teacher):
    with pytest.raises(ConfigError, match=rf"{name} .*{student.arch}.*bn_inception.*fit teacher bn_inception"):
        _build(name, student=student, teacher=teacher)


def test_feature_methods_reject_maps_of_different_sizes_at_run_time():
    method = _build("attention")
    student, teacher = _outputs(method)
    teacher.features = (teacher.features[0], teacher.features[1][:, :, :1, :1])
    with pytest.raises(ConfigError, match="stage 1"):
        method(student, teacher, _batch())
    teacher.features = None
    with pytest.raises(ConfigError, match="teacher's stage maps"):
        method(student, teacher, _batch())


def test_fitnet_and_attention_terms():
    fitnet = _build("fitnet", stage_weight=0.5, pa_weight=2.0)
    student, teacher = _outputs(fitnet)
    batch = _batch()
    terms = fitnet(student, teacher, batch)
    assert list(terms) == ["fitnet_stage0", "fitnet_stage1", "proxy_anchor"]
    for stage in range(2):
        regressed = fitnet.regressors[stage](student.features[stage])
        expected = 0.5 * functional.fitnet_stage(regressed, teacher.features[stage])
        torch.testing.assert_close(terms[f"fitnet_stage{stage}"], expected)
    torch.testing.assert_close(terms["proxy_anchor"], 2.0 * fitnet.proxy_anchor(student.embedding, batch.labels))
    attention = _build("attention", beta=10.0)
    terms = attention(student, teacher, batch)
    assert list(terms) == ["attention_stage0", "attention_stage1", "proxy_anchor"]
    for stage in range(2):
        expected = 10.0 * functional.attention_transfer(student.features[stage], teacher.features[stage])
        torch.testing.assert_close(terms[f"attention_stage{stage}"], expected)


def test_tap_strides_match_the_registered_backbones():
    from dmlkd.registry import BACKBONES

    for arch in ("resnet18", "bn_inception", "googlenet"):
        with torch.device("meta"):
            maps = BACKBONES.build(arch, pretrained=False)(torch.empty(1, 3, 224, 224))
        assert TAP_STRIDES[arch] == tuple(224 // m.shape[-1] for m in maps), arch


# ---------------------------------------------------------------------------------------------------------
# CRD.


def _crd(**options) -> CRD:
    return _build("crd", **options)


@pytest.mark.parametrize("rounds", [0, 1, 4, 50])
def test_crd_negatives_never_share_the_anchor_label(rounds):
    method = _crd(max_rejection_rounds=rounds)
    batch = _batch()
    contrast = method.sample_contrast_indices(batch.indices, batch.labels)
    assert contrast.shape == (IMAGES * NUM_VIEWS, 4096 + 1)
    assert torch.equal(contrast[:, 0], batch.indices)
    assert contrast.min() >= 0 and contrast.max() < NUM_TRAIN
    assert not (TRAIN_LABELS[contrast[:, 1:]] == batch.labels.unsqueeze(1)).any()
    # every other-class image is drawn (uniform with replacement over 4096 draws of <= 14 candidates)
    row = contrast[0, 1:]
    assert set(row.tolist()) == set(torch.nonzero(TRAIN_LABELS != batch.labels[0]).flatten().tolist())


def test_crd_draws_are_deterministic_and_resume():
    batch = _batch()
    first, second = _crd(seed=3, nce_k=256), _crd(seed=3, nce_k=256)
    draws = [first.sample_contrast_indices(batch.indices, batch.labels) for _ in range(2)]
    assert torch.equal(draws[0], second.sample_contrast_indices(batch.indices, batch.labels))
    assert not torch.equal(draws[0], draws[1])
    resumed = _crd(seed=3, nce_k=256)
    resumed.load_state_dict(second.state_dict())
    assert torch.equal(draws[1], resumed.sample_contrast_indices(batch.indices, batch.labels))
    assert not torch.equal(draws[0], _crd(seed=4, nce_k=256).sample_contrast_indices(batch.indices, batch.labels))


def test_crd_needs_labels_and_valid_indices():
    method = TRANSFER_METHODS.build("crd", TransferContext(STUDENT, TEACHER, NUM_CLASSES, NUM_TRAIN, 2))
    batch = _batch()
    with pytest.raises(RuntimeError, match="set_train_labels"):
        method.sample_contrast_indices(batch.indices, batch.labels)
    with pytest.raises(DataError, match="20 integer training labels"):
        method.set_train_labels(TRAIN_LABELS[:5])
    with pytest.raises(DataError, match=r"0\.\.2"):
        method.set_train_labels(TRAIN_LABELS + 1)
    method.set_train_labels(TRAIN_LABELS)
    student, teacher = _outputs(method)
    with pytest.raises(DataError, match="num_train=20"):
        method(student, teacher, batch._replace(indices=batch.indices + NUM_TRAIN))
    teacher.pooled = None
    with pytest.raises(ConfigError, match="pooled feature"):
        method(student, teacher, batch)


def test_crd_memory_update_formula():
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    features = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    updated = momentum_update(memory, torch.tensor([2, 0]), features, 0.5)
    expected_two = torch.tensor([1.5, 2.5]) / math.sqrt(1.5**2 + 2.5**2)  # 0.5·(3, 4) + 0.5·(0, 1)
    expected_zero = torch.tensor([0.8, 0.4]) / math.sqrt(0.8**2 + 0.4**2)  # 0.5·(1, 0) + 0.5·(0.6, 0.8)
    torch.testing.assert_close(updated, torch.stack([expected_zero, torch.tensor([0.0, 2.0]), expected_two]))
    assert memory[2].tolist() == [3.0, 4.0]  # out of place


def test_crd_memory_update_averages_duplicate_views_deterministically():
    generator = torch.Generator().manual_seed(0)
    start = F.normalize(torch.randn(5, 4, generator=generator), dim=1)
    features = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    indices = torch.tensor([1, 3, 4, 1, 3, 4])  # two views of three images
    results = []
    for order in (torch.arange(6), torch.tensor([3, 4, 5, 0, 1, 2]), torch.tensor([5, 0, 2, 4, 1, 3])):
        results.append(momentum_update(start, indices[order], features[order], 0.5))
    assert all(torch.equal(results[0], other) for other in results[1:])
    expected = start.clone()
    for slot, (a, b) in {1: (0, 3), 3: (1, 4), 4: (2, 5)}.items():
        expected[slot] = F.normalize(0.5 * start[slot] + 0.25 * (features[a] + features[b]), dim=0)
    torch.testing.assert_close(results[0], expected)


def _explicit_nce(scores: list[list[float]], z: float, k: int, n_data: int) -> float:
    noise = k / n_data
    total = 0.0
    for row in scores:
        positive = row[0] / z
        total += math.log(positive / (positive + noise + 1e-7))
        total += sum(math.log(noise / (o / z + noise + 1e-7)) for o in row[1:])
    return -total / len(scores)


def test_crd_loss_matches_explicit_computation_and_z_is_fixed():
    method = _crd(nce_k=5, weight=0.5).double()
    contrasts = []
    for step, seed in enumerate((0, 1)):
        batch = _batch(seed)
        contrast = method._contrast_per_image(batch.indices, batch.labels)  # one draw per image, every view
        method._contrast_per_image = lambda indices, labels, fixed=contrast: fixed  # replay these draws
        student, teacher = _outputs(method, seed=10 * seed)
        student.pooled, teacher.pooled = student.pooled.double(), teacher.pooled.double()
        banks = method.memory_student.clone(), method.memory_teacher.clone()
        terms = method(student, teacher, batch)
        del method._contrast_per_image
        contrasts.append(contrast)
        student_features = F.normalize(method.student_head(student.pooled), dim=1).detach()
        teacher_features = F.normalize(method.teacher_head(teacher.pooled), dim=1).detach()
        sides = {"crd_student_anchor": (banks[1], student_features, "z_student"),
                 "crd_teacher_anchor": (banks[0], teacher_features, "z_teacher")}  # fmt: skip
        for key, (bank, features, z_name) in sides.items():
            scores = [[math.exp(float(bank[j] @ features[i]) / 0.07) for j in contrast[i].tolist()]
                      for i in range(len(contrast))]  # fmt: skip
            if step == 0:
                first_z = sum(map(sum, scores)) / (len(scores) * 6) * NUM_TRAIN * NUM_VIEWS
                assert getattr(method, z_name).item() == pytest.approx(first_z, rel=1e-12)
                setattr(method, f"first_{z_name}", first_z)
            z = getattr(method, f"first_{z_name}")
            assert getattr(method, z_name).item() == pytest.approx(z, rel=1e-12)  # unchanged after step 0
            expected = 0.5 * _explicit_nce(scores, z, 5, NUM_TRAIN * NUM_VIEWS)
            assert terms[key].item() == pytest.approx(expected, rel=1e-9)
    assert "z_student" in method.state_dict() and "memory_teacher" in method.state_dict()


def test_crd_updates_memory_only_in_training():
    method = _crd(nce_k=8)
    student, teacher = _outputs(method)
    before = method.memory_student.clone()
    method.eval()
    method(student, teacher, _batch())
    assert torch.equal(before, method.memory_student)
    method.train()
    method(student, teacher, _batch())
    changed = (before != method.memory_student).any(dim=1)
    assert set(torch.nonzero(changed).flatten().tolist()) == set(_batch().indices.tolist())
    assert method.memory_student.shape == (NUM_TRAIN, 128)  # no unused len..2·len slots
