"""Stage-1 teacher losses: oracle loops, PyTorch-Metric-Learning parity, mixed precision and input checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

from dmlkd.errors import ConfigError, DataError
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher import ArcMarginLoss, NormSoftmaxLoss, ProxyAnchorLoss, SoftmaxLoss
from dmlkd.teacher.losses.arcmargin import target_logit


@pytest.fixture(autouse=True)
def _seed_parameter_init():
    torch.manual_seed(0)  # the losses draw their class vectors from the global generator


def make_batch(num_samples: int, dim: int, num_classes: int, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(num_samples, dim, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return embeddings, labels


def unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector) + 1e-12)
    return [v / norm for v in vector]


def cosine_table(embeddings: torch.Tensor, vectors: torch.Tensor) -> list[list[float]]:
    """cos[i][c] between sample i and class vector c, computed with Python floats."""
    rows = [unit(row) for row in embeddings.tolist()]
    cols = [unit(col) for col in vectors.tolist()]
    return [[sum(a * b for a, b in zip(row, col)) for col in cols] for row in rows]


def log_softmax_at(logits: list[float], index: int) -> float:
    top = max(logits)
    return logits[index] - top - math.log(sum(math.exp(v - top) for v in logits))


# ---------------------------------------------------------------------------------------------------------
# Proxy-Anchor


def proxy_anchor_oracle(embeddings, labels, proxies, margin, alpha) -> float:
    """seed-spec §2.1 literally: mean over proxies with positives + mean over all C proxies."""
    cos = cosine_table(embeddings, proxies)
    labels = labels.tolist()
    num_classes = proxies.shape[0]
    pos_total, num_with_pos, neg_total = 0.0, 0, 0.0
    for p in range(num_classes):
        positives = [i for i, y in enumerate(labels) if y == p]
        negatives = [i for i, y in enumerate(labels) if y != p]
        if positives:
            num_with_pos += 1
            pos_total += math.log(1 + sum(math.exp(-alpha * (cos[i][p] - margin)) for i in positives))
        neg_total += math.log(1 + sum(math.exp(alpha * (cos[i][p] + margin)) for i in negatives))
    return pos_total / num_with_pos + neg_total / num_classes


@pytest.mark.parametrize(("num_classes", "margin", "alpha"), [(7, 0.1, 32.0), (2, 0.2, 16.0), (12, 0.0, 32.0)])
def test_proxy_anchor_matches_loop_oracle(num_classes, margin, alpha):
    embeddings, labels = make_batch(10, 6, num_classes, seed=num_classes)
    loss = ProxyAnchorLoss(num_classes, 6, margin=margin, alpha=alpha).double()
    expected = proxy_anchor_oracle(embeddings, labels, loss.proxies.detach(), margin, alpha)
    assert loss(embeddings, labels).item() == pytest.approx(expected, rel=1e-10)


def test_proxy_anchor_matches_pml_value_and_gradients():
    # PML divides its negative term by num_classes, i.e. averages over all C proxies like the reference.
    num_classes = 9  # more classes than occur in the batch, so |P+| < C
    embeddings, labels = make_batch(12, 8, 5, seed=3)
    ours = ProxyAnchorLoss(num_classes, 8).double()
    theirs = pml_losses.ProxyAnchorLoss(num_classes, 8, margin=0.1, alpha=32)
    theirs.proxies.data = ours.proxies.detach().clone()
    ours_in = embeddings.clone().requires_grad_(True)
    theirs_in = embeddings.clone().requires_grad_(True)
    ours_value, theirs_value = ours(ours_in, labels), theirs(theirs_in, labels)
    ours_value.backward()
    theirs_value.backward()
    torch.testing.assert_close(ours_value, theirs_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.proxies.grad, theirs.proxies.grad, rtol=1e-6, atol=1e-9)


def test_proxy_anchor_absent_classes_pass_finite_zero_positive_gradient():
    loss = ProxyAnchorLoss(6, 4)
    embeddings = torch.randn(4, 4, requires_grad=True)
    loss(embeddings, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(loss.proxies.grad).all() and torch.isfinite(embeddings.grad).all()
    # absent proxies only get the (nonzero) negative-term gradient
    assert loss.proxies.grad[2:].abs().sum() > 0


def test_proxy_anchor_init_is_kaiming_fan_out():
    loss = ProxyAnchorLoss(400, 256)
    assert loss.proxies.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    assert loss.proxies.mean().abs().item() < 0.01


def test_proxy_anchor_ignores_embedding_norm():
    embeddings, labels = make_batch(8, 5, 3)
    loss = ProxyAnchorLoss(3, 5).double()
    torch.testing.assert_close(loss(embeddings, labels), loss(embeddings * 250.0, labels))


# ---------------------------------------------------------------------------------------------------------
# ArcMargin


def arcmargin_oracle(embeddings, labels, weight, scale, margin, easy_margin) -> float:
    """Per-sample loop of the PaddlePaddle formula (seed-spec §2.2)."""
    cos = cosine_table(embeddings, weight)
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        c = cos[i][y]
        phi = c * math.cos(margin) - math.sqrt(1 - c * c + 1e-6) * math.sin(margin)
        if easy_margin:
            target = phi if c > 0 else c
        else:
            target = phi if c > math.cos(math.pi - margin) else c - margin * math.sin(math.pi - margin)
        logits = [scale * (target if j == y else v) for j, v in enumerate(cos[i])]
        total -= log_softmax_at(logits, y)
    return total / len(cos)


def hard_arcmargin_batch(weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Half the samples sit nearly opposite their class weight (θ ≈ π: the fallback), half near it."""
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(len(labels), weight.shape[1], generator=generator, dtype=weight.dtype)
    embeddings = noise.clone()
    half = len(labels) // 2
    unit_rows = F.normalize(weight[labels[:half]], dim=1)
    embeddings[:half] = -unit_rows + 0.01 * noise[:half]
    embeddings[half:] = F.normalize(weight[labels[half:]], dim=1) + 0.2 * noise[half:]
    return embeddings


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcmargin_matches_loop_oracle_including_fallback(easy_margin):
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    loss = ArcMarginLoss(5, 6, easy_margin=easy_margin).double()
    weight = loss.weight.detach()
    embeddings = hard_arcmargin_batch(weight, labels)
    target_cos = F.cosine_similarity(embeddings, weight[labels], dim=1)
    assert (target_cos < math.cos(math.pi - 0.15)).any()  # the fallback branch is exercised
    assert (target_cos > 0).any()  # and the margin branch
    expected = arcmargin_oracle(embeddings, labels, weight, 80.0, 0.15, easy_margin)
    assert loss(embeddings, labels).item() == pytest.approx(expected, rel=1e-9)


def test_arcmargin_target_logit_is_monotonic_without_easy_margin():
    cosine = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    for margin in (0.15, 0.5, 1.0):
        values = target_logit(cosine, margin, easy_margin=False)
        assert (values[1:] - values[:-1] >= -1e-12).all()
        assert (values <= cosine + 1e-12).all()  # the margin never helps the target class


def test_arcmargin_matches_pml_arcface_where_no_fallback_triggers():
    num_classes, dim, margin, scale = 6, 16, 0.3, 30.0
    embeddings, labels = make_batch(14, dim, num_classes, seed=11)
    ours = ArcMarginLoss(num_classes, dim, scale=scale, margin=margin).double()
    theirs = pml_losses.ArcFaceLoss(num_classes, dim, margin=math.degrees(margin), scale=scale)
    theirs.W.data = ours.weight.detach().T.clone()  # PML stores W as (D, C)
    target_cos = F.cosine_similarity(embeddings, ours.weight.detach()[labels], dim=1)
    assert (target_cos > math.cos(math.pi - margin)).all()
    # only difference: the 1e-6 inside the reference sine, worth ~1e-5 at this scale
    torch.testing.assert_close(ours(embeddings, labels), theirs(embeddings, labels), rtol=1e-5, atol=1e-4)


def test_arcmargin_init_is_xavier_uniform():
    loss = ArcMarginLoss(300, 200)
    bound = math.sqrt(6 / 500)
    assert loss.weight.abs().max().item() <= bound
    assert loss.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


# ---------------------------------------------------------------------------------------------------------
# Softmax and normalised softmax


def test_softmax_matches_manual_linear_cross_entropy():
    embeddings, labels = make_batch(9, 7, 4, seed=2)
    loss = SoftmaxLoss(4, 7).double()
    with torch.no_grad():
        loss.bias.normal_()  # exercise the bias path
    weight, bias = loss.weight.detach(), loss.bias.detach()
    expected = F.cross_entropy(embeddings @ weight.T + bias, labels)
    torch.testing.assert_close(loss(embeddings, labels), expected, rtol=1e-12, atol=1e-12)
    by_hand = -sum(log_softmax_at((embeddings[i] @ weight.T + bias).tolist(), y) for i, y in enumerate(labels.tolist()))
    assert loss(embeddings, labels).item() == pytest.approx(by_hand / 9, rel=1e-10)


def test_softmax_init_matches_paddle_fc():
    loss = SoftmaxLoss(50, 64)
    assert loss.weight.abs().max().item() <= 1 / 8
    assert loss.weight.std().item() == pytest.approx(1 / 8 / math.sqrt(3), rel=0.05)
    assert torch.equal(loss.bias.detach(), torch.zeros(50))


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_norm_softmax_matches_pml(temperature):
    embeddings, labels = make_batch(10, 12, 5, seed=4)
    ours = NormSoftmaxLoss(5, 12, temperature=temperature).double()
    theirs = pml_losses.NormalizedSoftmaxLoss(5, 12, temperature=temperature)
    theirs.W.data = ours.weight.detach().T.clone() * 3.0  # PML layout (D, C); the weight norm must not matter
    torch.testing.assert_close(ours(embeddings, labels), theirs(embeddings, labels), rtol=1e-10, atol=1e-12)


def test_norm_softmax_matches_loop_oracle():
    embeddings, labels = make_batch(6, 3, 4, seed=8)
    loss = NormSoftmaxLoss(4, 3, temperature=0.1).double()
    cos = cosine_table(embeddings, loss.weight.detach())
    expected = -sum(log_softmax_at([v / 0.1 for v in cos[i]], y) for i, y in enumerate(labels.tolist())) / 6
    assert loss(embeddings, labels).item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Properties shared by all four losses


# ---------------------------------------------------------------------------------------------------------
# Registry-wide contract: every registered loss, built from its defaults, with no list to edit.

CONTRACT_CLASSES, CONTRACT_PER_CLASS = 5, 2  # a class-ordered P x K batch (npairs needs K = 2)


def contract_labels(classes: int = CONTRACT_CLASSES - 1) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(CONTRACT_PER_CLASS)  # [0, 0, 1, 1, ...]


def check_loss_contract(name: str) -> None:
    """What every teacher loss must do; raises AssertionError (or the loss's error) otherwise."""
    factory = TEACHER_LOSSES.get(name)
    assert isinstance(factory.lr_multiplier, float) and factory.lr_multiplier > 0
    with pytest.raises(ConfigError, match=f"unknown option 'no_such_option' for loss '{name}'"):
        TEACHER_LOSSES.build(name, CONTRACT_CLASSES, 32, no_such_option=1)
    labels = contract_labels()

    # Finite under bf16 autocast with large norms; the loss is computed in float32.
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 32)
    loss = TEACHER_LOSSES.build(name, CONTRACT_CLASSES, 32)
    features = torch.randn(len(labels), 16) * 5e3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = head(features)
        assert embeddings.dtype == torch.bfloat16
        value = loss(embeddings, labels)
    assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    for parameter in [*head.parameters(), *loss.parameters()]:
        assert parameter.grad is None or torch.isfinite(parameter.grad).all()

    # Half-precision inputs near the fp16 maximum.
    loss = TEACHER_LOSSES.build(name, CONTRACT_CLASSES, 8)
    embeddings = (torch.randn(len(labels), 8) * 2e4).clamp(-6e4, 6e4).half().requires_grad_(True)
    value = loss(embeddings, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(embeddings.grad.float()).all()

    # A scalar; gradients reach the embeddings and every trainable parameter of the loss.
    loss = TEACHER_LOSSES.build(name, CONTRACT_CLASSES, 3)
    embeddings = torch.randn(len(labels), 3, requires_grad=True)
    value = loss(embeddings, labels)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert embeddings.grad.abs().sum() > 0
    for parameter_name, parameter in loss.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name

    # Double precision is kept.
    loss = TEACHER_LOSSES.build(name, CONTRACT_CLASSES, 4).double()
    embeddings = torch.randn(len(labels), 4, dtype=torch.float64)
    assert loss(embeddings, labels).dtype == torch.float64

    # A label outside 0..C-1 is a one-line DataError naming the label and the class count.
    loss = TEACHER_LOSSES.build(name, CONTRACT_CLASSES, 4)
    bad = labels.clone()
    bad[-2:] = 7
    with pytest.raises(DataError, match=rf"label 7 .*num_classes={CONTRACT_CLASSES}") as info:
        loss(torch.randn(len(labels), 4), bad)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"label -1 "):
        loss(torch.randn(len(labels), 4), labels - 1)


@pytest.mark.parametrize("name", TEACHER_LOSSES.names())
def test_loss_contract(name):
    check_loss_contract(name)


def readme_loss_example() -> str:
    """The Contributing section's example file (README.md: "Adding a teacher loss: one file, one decorator")."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Adding a teacher loss: one file, one decorator") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_loss_in_one_new_file_with_one_decorator_is_picked_up(tmp_path, monkeypatch):
    import sys

    import dmlkd.teacher.losses as package
    from dmlkd.registry import import_submodules

    (tmp_path / "center.py").write_text(readme_loss_example())
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    assert "center" not in TEACHER_LOSSES.names()
    try:
        import_submodules(package.__name__, package.__path__)  # what importing the package does
        assert "center" in TEACHER_LOSSES.names() and TEACHER_LOSSES.options("center") == {"scale": 1.0}
        check_loss_contract("center")
        with pytest.raises(ConfigError, match=r"^loss 'center' option scale: expected a number, got 'big'$"):
            TEACHER_LOSSES.build("center", 3, 4, scale="big")
    finally:
        TEACHER_LOSSES.unregister("center")
        sys.modules.pop(f"{package.__name__}.center", None)
    assert "center" not in TEACHER_LOSSES.names()


def test_contract_rejects_a_loss_that_breaks_it():
    @TEACHER_LOSSES.register("throwaway_broken")
    class BrokenLoss(torch.nn.Module):  # ignores its labels' range and returns a vector
        lr_multiplier: float = 1.0

        def __init__(self, num_classes: int, embedding_dim: int) -> None:
            super().__init__()

        def forward(self, embeddings, labels):
            return embeddings.float().pow(2).sum(dim=1)

    try:
        with pytest.raises(AssertionError):
            check_loss_contract("throwaway_broken")
    finally:
        TEACHER_LOSSES.unregister("throwaway_broken")


def test_registry_names_factories_and_lr_multipliers():
    assert {"arcmargin", "norm_softmax", "proxy_anchor", "softmax"} <= set(TEACHER_LOSSES.names())
    expected = {"proxy_anchor": (ProxyAnchorLoss, 100.0), "arcmargin": (ArcMarginLoss, 1.0)}
    expected |= {"softmax": (SoftmaxLoss, 1.0), "norm_softmax": (NormSoftmaxLoss, 1.0)}
    for name, (loss_class, multiplier) in expected.items():
        assert TEACHER_LOSSES.get(name) is loss_class
        assert loss_class.lr_multiplier == multiplier
        built = TEACHER_LOSSES.build(name, num_classes=3, embedding_dim=4)
        assert isinstance(built, loss_class)
    built = TEACHER_LOSSES.build("proxy_anchor", num_classes=3, embedding_dim=4, margin=0.2, alpha=16)
    assert (built.margin, built.alpha, tuple(built.proxies.shape)) == (0.2, 16.0, (3, 4))


# ---------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("embeddings", "labels", "error", "pattern"),
    [
        (torch.randn(3, 6), torch.tensor([0, 1, 2]), ConfigError, "6-d embeddings .*embedding_dim=4"),
        (torch.randn(3, 4), torch.tensor([0, 1]), DataError, "labels must have shape"),
        (torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]), DataError, "integer tensor"),
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), DataError, "non-empty"),
        (torch.randn(4), torch.tensor([0]), DataError, "non-empty"),
    ],
)
def test_malformed_batches_raise_one_line_errors(embeddings, labels, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        ProxyAnchorLoss(5, 4)(embeddings, labels)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("loss_class", "kwargs", "pattern"),
    [
        (ProxyAnchorLoss, {"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
        (SoftmaxLoss, {"num_classes": 3.0}, "num_classes must be an integer >= 2"),
        (ArcMarginLoss, {"num_classes": True}, "num_classes"),
        (NormSoftmaxLoss, {"embedding_dim": 0}, "embedding_dim must be an integer >= 1, got 0"),
        (ProxyAnchorLoss, {"alpha": 0}, "proxy_anchor alpha must be .*got 0"),
        (ProxyAnchorLoss, {"margin": -0.1}, "proxy_anchor margin .*got -0.1"),
        (ProxyAnchorLoss, {"alpha": float("nan")}, "alpha"),
        (ArcMarginLoss, {"scale": -1.0}, "arcmargin scale .*got -1.0"),
        (ArcMarginLoss, {"margin": 4.0}, "arcmargin margin .*got 4.0"),
        (
            ArcMarginLoss,
            {"easy_margin": "yes"},
            "loss 'arcmargin' option easy_margin: expected true or false, got 'yes'",
        ),
        (NormSoftmaxLoss, {"temperature": 0.0}, "norm_softmax temperature .*got 0.0"),
        (NormSoftmaxLoss, {"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_constructor_arguments(loss_class, kwargs, pattern):
    arguments = {"num_classes": 3, "embedding_dim": 4, **kwargs}
    name = next(name for name in TEACHER_LOSSES.names() if TEACHER_LOSSES.get(name) is loss_class)
    with pytest.raises(ConfigError, match=pattern) as info:
        TEACHER_LOSSES.build(name, **arguments)  # the registry checks the types, the loss the ranges
    assert "\n" not in str(info.value)
