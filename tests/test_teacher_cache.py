"""Teacher-output cache: exact replay against the online teacher, clean views, keys and invalidation."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.data.base import ArrayImageCollection
from dmlkd.data.transforms import ReplaySpec, TrainDataset, collate_views, eval_view
from dmlkd.errors import ConfigError, DataError
from dmlkd.models import create_model
from dmlkd.transfer.cache import storage as cache_file_module
from dmlkd.transfer.cache import teacher_cache as cache_module
from dmlkd.transfer.cache.teacher_cache import (
    CacheSpec,
    TeacherCache,
    build_cache,
    cache_key,
    cache_path,
    describe_cache,
    load_or_build_cache,
    teacher_digest,
)

NUM_IMAGES = 6
SPEC = CacheSpec(mode="cached", num_sets=3, seed=7, image_size=16, scale=(0.3, 1.0), flip_p=0.5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny convolutions are ~50x slower with 2 intra-op threads on a busy 2-core machine than with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet18-8", l2_norm=True).eval()


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return _teacher()


@pytest.fixture(scope="module")
def collection() -> ArrayImageCollection:
    images = np.random.default_rng(1).integers(0, 256, (NUM_IMAGES, 20, 24, 3), dtype=np.uint8)  # non-square
    return ArrayImageCollection(images, [f"img{i}" for i in range(NUM_IMAGES)], [0, 1, 2, 0, 1, 2])


class _Counter:
    """Counts teacher forwards (a forward hook) and ``build_cache`` calls made by ``load_or_build_cache``."""

    def __init__(self, teacher: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forwards = 0
        self.builds = 0
        self.handle = teacher.register_forward_hook(self._hook)
        original = cache_module.build_cache

        def counting_build(*args, **kwargs):
            self.builds += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cache_module, "build_cache", counting_build)

    def _hook(self, *_: object) -> None:
        self.forwards += 1


@pytest.fixture
def counter(teacher, monkeypatch):
    counter = _Counter(teacher, monkeypatch)
    yield counter
    counter.handle.remove()


def _load(teacher, collection, folder: Path, spec: CacheSpec = SPEC, digest: str | None = None) -> TeacherCache:
    digest = teacher_digest(teacher) if digest is None else digest
    return load_or_build_cache(teacher, collection, spec, folder, teacher_digest=digest, progress=False)


def _fp16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float16).float()


def test_cached_rows_equal_the_online_teacher_on_replayed_training_views(teacher, collection, tmp_path):
    spec = dataclasses.replace(SPEC, with_pooled=True)
    cache = _load(teacher, collection, tmp_path, spec)
    dataset = TrainDataset(collection, 16, views=2, seed=3, scale=spec.scale, flip_p=0.5, replay=spec.replay)
    cache.check_dataset(dataset)
    keys = [(0, 0), (3, 1), (5, 2), (1, 3), (2, 40), (4, 41), (0, 42)]
    batch, replay_k = collate_views([dataset[key] for key in keys])
    assert len(set(replay_k.tolist())) > 1  # the draws exercise several stored sets
    with torch.no_grad():
        online = teacher(batch.images)
    looked_up = cache.lookup(batch.indices, replay_k)
    assert looked_up.embedding.shape == (2 * len(keys), 8)
    torch.testing.assert_close(looked_up.embedding, _fp16(online.embedding), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(looked_up.pooled, _fp16(online.pooled), rtol=1e-3, atol=1e-4)
    # the check can fail: another set of the same image gives a clearly different embedding
    other = cache.lookup(batch.indices, (replay_k + 1) % spec.num_sets).embedding
    assert (other - online.embedding).abs().amax(dim=1).min() > 1e-2


def test_clean_cache_equals_the_teacher_on_eval_views(teacher, collection, tmp_path):
    spec = CacheSpec(mode="clean", num_sets=1, seed=0, image_size=16, eval_resize_ratio=1.25)
    cache = _load(teacher, collection, tmp_path, spec)
    images = torch.stack([eval_view(collection.load(i), 16, 1.25) for i in range(NUM_IMAGES)])
    with torch.no_grad():
        online = teacher(images).embedding
    indices = torch.tensor([4, 0, 2, 4])
    looked_up = cache.lookup(indices, torch.full((4,), -1)).embedding  # replay_k is ignored in clean mode
    torch.testing.assert_close(looked_up, _fp16(online[indices]), rtol=1e-3, atol=1e-5)
    assert spec.replay is None and cache.pooled is None


def test_lookup_dtype_shape_device_and_errors(teacher, collection, tmp_path):
    cache = _load(teacher, collection, tmp_path)
    assert cache.embeddings.dtype == torch.float16 and cache.embeddings.shape == (NUM_IMAGES, 3, 8)
    indices, replay_k = torch.tensor([1, 2, 1, 2]), torch.tensor([0, 2, 1, 0])
    output = cache.lookup(indices, replay_k, device="cpu")
    assert output.embedding.dtype == torch.float32 and output.embedding.device == torch.device("cpu")
    assert output.embedding.shape == (4, 8) and output.pooled is None
    torch.testing.assert_close(output.embedding[1], cache.embeddings[2, 2].float())
    with pytest.raises(ConfigError, match="without replay"):
        cache.lookup(indices, torch.full((4,), -1))
    with pytest.raises(ConfigError, match="replay_k"):
        cache.lookup(indices)
    with pytest.raises(DataError, match="indices"):
        cache.lookup(torch.tensor([NUM_IMAGES]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="does not replay"):
        cache.check_dataset(TrainDataset(collection, 16, views=2, scale=SPEC.scale, replay=ReplaySpec(3, 8)))
    assert teacher.training is False


def test_teacher_train_mode_is_restored_after_build(collection, tmp_path):
    model = _teacher().train()
    build_cache(model, collection, SPEC, tmp_path / "c.safetensors", progress=False)
    assert all(module.training for module in model.modules())


def test_unchanged_inputs_reuse_the_cache_without_teacher_forward(teacher, collection, tmp_path, counter):
    first = _load(teacher, collection, tmp_path)
    assert counter.builds == 1 and counter.forwards > 0
    counter.forwards = 0
    second = _load(teacher, collection, tmp_path)
    assert counter.builds == 1 and counter.forwards == 0
    assert torch.equal(first.embeddings, second.embeddings) and second.key == first.key
    assert [path.name for path in tmp_path.iterdir()] == [cache_path(tmp_path, first.key).name]  # no temp files


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 12},
        {"scale": (0.5, 1.0)},
        {"ratio": (0.5, 2.0)},
        {"flip_p": 0.0},
        {"num_sets": 2},
        {"seed": 8},
        {"mode": "clean", "num_sets": 1},
        {"with_pooled": True},
    ],
)
def test_each_spec_part_changes_the_key_and_rebuilds(teacher, collection, tmp_path, counter, change):
    digest = teacher_digest(teacher)
    base = _load(teacher, collection, tmp_path, SPEC, digest)
    spec = dataclasses.replace(SPEC, **change)
    assert cache_key(spec, digest, collection) != base.key
    rebuilt = _load(teacher, collection, tmp_path, spec, digest)
    assert counter.builds == 2 and rebuilt.spec == spec


def test_key_ignores_fields_the_mode_does_not_use(collection):
    clean = CacheSpec(mode="clean", num_sets=1, seed=0, image_size=16)
    assert cache_key(clean, "t", collection) == cache_key(
        dataclasses.replace(clean, seed=5, flip_p=0.0), "t", collection
    )
    assert cache_key(clean, "t", collection) != cache_key(
        dataclasses.replace(clean, eval_resize_ratio=1.0), "t", collection
    )
    assert cache_key(SPEC, "t", collection) == cache_key(
        dataclasses.replace(SPEC, eval_resize_ratio=1.0), "t", collection
    )
    assert cache_key(SPEC, "t", collection) == cache_key(dataclasses.replace(SPEC, scale=[0.3, 1]), "t", collection)


def test_teacher_weights_and_identifiers_change_the_key_and_rebuild(teacher, collection, tmp_path, counter):
    base = _load(teacher, collection, tmp_path)
    other_teacher = _teacher(seed=1)
    other_digest = teacher_digest(other_teacher)
    assert other_digest != teacher_digest(teacher)
    assert cache_key(SPEC, other_digest, collection) != base.key
    rebuilt = _load(other_teacher, collection, tmp_path, digest=other_digest)
    assert counter.builds == 2 and not torch.equal(rebuilt.embeddings, base.embeddings)
    renamed = ArrayImageCollection(collection.images, [f"x/img{i}" for i in range(NUM_IMAGES)], collection.labels)
    assert cache_key(SPEC, teacher_digest(teacher), renamed) != base.key
    _load(teacher, renamed, tmp_path)
    assert counter.builds == 3


def test_digest_of_checkpoint_uses_recorded_file_digest(tmp_path):
    model = _teacher()
    save_checkpoint(tmp_path / "run" / "last", model)
    digest = teacher_digest(tmp_path / "run")  # a run folder stands for its last/
    assert digest == teacher_digest(tmp_path / "run" / "last") and len(digest) == 64
    assert digest != teacher_digest(model)  # a state-dict digest is another kind of digest
    with torch.no_grad():
        model.embedding.bias.add_(1.0)
    assert teacher_digest(model) != teacher_digest(_teacher())
    save_checkpoint(tmp_path / "run" / "last", model)
    assert teacher_digest(tmp_path / "run") != digest


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_damaged_cache_file_is_rebuilt(teacher, collection, tmp_path, counter, damage):
    original = _load(teacher, collection, tmp_path)
    path = cache_path(tmp_path, original.key)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        path.write_bytes(b"not a safetensors file")
    rebuilt = _load(teacher, collection, tmp_path)
    assert counter.builds == 2 and torch.equal(rebuilt.embeddings, original.embeddings)
    assert describe_cache(path)["key"] == original.key  # the file itself was rewritten, whole
    assert torch.equal(_load(teacher, collection, tmp_path).embeddings, original.embeddings)
    assert counter.builds == 2


def test_cache_file_of_another_teacher_is_not_used(teacher, collection, tmp_path, counter, caplog):
    other_teacher = _teacher(seed=1)
    other = _load(other_teacher, collection, tmp_path, digest=teacher_digest(other_teacher))
    wanted_key = cache_key(SPEC, teacher_digest(teacher), collection)
    shutil.copy(cache_path(tmp_path, other.key), cache_path(tmp_path, wanted_key))  # wrong content, right name
    with caplog.at_level(logging.WARNING, logger="dmlkd.transfer.cache.teacher_cache"):
        cache = _load(teacher, collection, tmp_path)
    assert counter.builds == 2 and "teacher_digest" in caplog.text
    own = build_cache(teacher, collection, SPEC, tmp_path / "own" / "c.safetensors", progress=False)
    assert torch.equal(cache.embeddings, own.embeddings) and not torch.equal(cache.embeddings, other.embeddings)


def test_stale_sibling_caches_are_reported(teacher, collection, tmp_path, caplog):
    _load(teacher, collection, tmp_path)
    with caplog.at_level(logging.INFO, logger="dmlkd.transfer.cache.teacher_cache"):
        _load(teacher, collection, tmp_path, dataclasses.replace(SPEC, seed=9))
    assert "spec.seed 7 -> 9" in caplog.text


def test_build_cache_rejects_a_key_of_other_inputs(teacher, collection, tmp_path):
    with pytest.raises(ConfigError, match="does not match"):
        build_cache(teacher, collection, SPEC, tmp_path / "c.safetensors", key="0" * 64, progress=False)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(teacher, collection, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    build_cache(teacher, collection, SPEC, path, progress=False)
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_file_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build_cache(teacher, collection, SPEC, path, progress=False)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_describe_cache(teacher, collection, tmp_path):
    spec = dataclasses.replace(SPEC, with_pooled=True)
    cache = _load(teacher, collection, tmp_path, spec)
    info = describe_cache(cache_path(tmp_path, cache.key))
    assert info["key"] == cache.key and info["mode"] == "cached"
    assert (info["num_images"], info["num_sets"], info["embedding_dim"]) == (NUM_IMAGES, 3, 8)
    assert info["pooled_dim"] == teacher.pooled_dim and info["spec"]["seed"] == 7
    assert info["teacher"]["arch"] == "resnet18" and info["teacher_digest"] == teacher_digest(teacher)
    json.dumps(info)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable dmlkd teacher cache"):
        describe_cache(bad)


@pytest.mark.parametrize(
    "fields",
    [
        {"mode": "online", "num_sets": 1},
        {"mode": "clean", "num_sets": 2},
        {"mode": "cached", "num_sets": 0},
        {"mode": "cached", "num_sets": 2, "scale": (0.9, 0.1)},
        {"mode": "cached", "num_sets": 2, "flip_p": 1.5},
        {"mode": "cached", "num_sets": 2, "autocast": "int8"},
    ],
)
def test_invalid_spec_is_a_config_error(fields):
    with pytest.raises(ConfigError):
        CacheSpec(seed=0, image_size=16, **fields)
