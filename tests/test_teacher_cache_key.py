"""The teacher cache is keyed by everything its rows depend on, runs at the training precision, resumes a
build after an interrupt, refreshes its views on request, and a default (``auto`` = online) run does not pay
for it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.cli import main
from dmlkd.config import apply_overrides, from_dict
from dmlkd.data.base import ArrayImageCollection, FileImageCollection
from dmlkd.data.catalog import build_splits
from dmlkd.data.training import build_train_data
from dmlkd.data.transforms import ReplaySpec, TrainDataset, collate_views
from dmlkd.errors import ConfigError
from dmlkd.models import create_model
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.cache import content as cache_content
from dmlkd.transfer.cache import teacher_cache as cache_module
from dmlkd.transfer.cache.lookup import RefreshingCache
from dmlkd.transfer.cache.teacher_cache import (
    CacheSpec,
    build_cache,
    describe_cache,
    load_or_build_cache,
)
from dmlkd.transfer.cache.teacher_cache import teacher_digest as digest_of
from dmlkd.transfer.config import TransferConfig, start_tree
from dmlkd.transfer.teacher_source import build_teacher_source

SPEC = CacheSpec(mode="cached", num_sets=2, seed=3, image_size=16, scale=(0.3, 1.0))
GLYPHS = ["data.name=glyphs", "data.options.max_classes=16"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
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


def _write_pngs(folder: Path, seed: int, count: int = 4) -> FileImageCollection:
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (count, 20, 20, 3), dtype=np.uint8)
    names = [f"{i:04d}.png" for i in range(count)]
    for name, image in zip(names, pixels):
        Image.fromarray(image).save(folder / name)
    return FileImageCollection(folder, names, list(range(count)))


def _load(teacher, collection, folder, spec=SPEC):
    return load_or_build_cache(teacher, collection, spec, folder, teacher_digest="t", progress=False)


def test_same_names_different_pixels_rebuild(teacher, tmp_path):
    first = _write_pngs(tmp_path / "a", seed=1)
    second = _write_pngs(tmp_path / "b", seed=2)
    assert first.identifiers == second.identifiers
    cache_dir = tmp_path / "cache"
    one, two = _load(teacher, first, cache_dir), _load(teacher, second, cache_dir)
    assert one.key != two.key and not torch.equal(one.embeddings, two.embeddings)
    assert len(list(cache_dir.glob("teacher-*.safetensors"))) == 2


def test_file_hashes_are_reused_until_a_file_changes(tmp_path, monkeypatch):
    collection = _write_pngs(tmp_path / "images", seed=1)
    index = tmp_path / "index"
    reads = []
    original = cache_content._file_sha256
    monkeypatch.setattr(cache_content, "_file_sha256", lambda path: reads.append(path) or original(path))
    before = cache_content.images_digest(collection, index)
    assert len(reads) == 4 and len(list(index.glob("image-index-*.json"))) == 1
    reads.clear()
    assert cache_content.images_digest(collection, index) == before and reads == []  # a stat per file only
    path = collection.path(2)
    status = path.stat()
    other = np.asarray(Image.open(path)).copy()
    other[0, 0] ^= 0xFF
    Image.fromarray(other).save(path)
    assert path.stat().st_size == status.st_size
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))  # same size, same mtime: ctime still moved
    assert cache_content.images_digest(collection, index) != before and reads == [path]


def test_array_images_are_keyed_by_their_pixels():
    pixels = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    changed = pixels.copy()
    changed[1, 4, 4] = 1
    names = ["a", "b", "c"]
    same = cache_content.images_digest(ArrayImageCollection(pixels, names, [0, 1, 2]))
    assert same != cache_content.images_digest(ArrayImageCollection(changed, names, [0, 1, 2]))


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher") / "ckpt"
    save_checkpoint(folder, _teacher())
    return folder


def _cache_build(teacher_folder: Path, cache_dir: Path, *extra: str) -> dict:
    code, stdout, stderr = _cli(
        "cache",
        "build",
        "--teacher",
        str(teacher_folder),
        "--dataset",
        "glyphs",
        "--set",
        "data.options.max_classes=16",
        "--cache-views",
        "1",
        "--image-size",
        "16",
        "--no-progress",
        "--set",
        f"teacher.cache_dir={cache_dir}",
        *extra,
    )
    assert code == 0, stderr
    return json.loads(stdout)


def test_glyph_render_seed_and_teacher_config_rebuild_the_cache(teacher_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    base = _cache_build(teacher_folder, cache_dir)
    assert _cache_build(teacher_folder, cache_dir)["key"] == base["key"]  # unchanged inputs: the same file
    reseeded = _cache_build(teacher_folder, cache_dir, "--set", "data.options.seed=1")
    assert reseeded["key"] != base["key"]
    # the same weights, another preprocessing in config.json: another teacher
    changed = teacher_folder.parent / "changed"
    changed.mkdir()
    for name in ("model.safetensors", "config.json"):
        (changed / name).write_bytes((teacher_folder / name).read_bytes())
    record = json.loads((changed / "config.json").read_text())
    record["model"]["preprocessing"] = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (changed / "config.json").write_text(json.dumps(record))
    other = _cache_build(changed, cache_dir)
    assert other["key"] != base["key"] and other["teacher_digest"] == digest_of(changed)
    assert len(list(cache_dir.glob("teacher-*.safetensors"))) == 3


def _config(teacher_folder: Path, cache_dir: Path, *items: str) -> TransferConfig:
    tree = apply_overrides(
        start_tree(None, "glyphs"),
        [
            f"teacher.ref={teacher_folder}",
            f"teacher.cache_dir={cache_dir}",
            "teacher.mode=cached",
            "teacher.cache_views=2",
            *GLYPHS,
            "train.image_size=16",
            "train.batch_size=16",
            "train.ipc=4",
            "train.progress=false",
            *items,
        ],
    )
    return from_dict(TransferConfig, tree)


def test_cached_equals_online_under_the_training_autocast(teacher_folder, tmp_path):
    from dmlkd.checkpoints.io import load_checkpoint

    config = _config(teacher_folder, tmp_path / "cache", "train.mixed_precision=bf16")
    splits, _ = build_splits(config.data)
    data = build_train_data(splits, config.train, replay=ReplaySpec(2, config.train.seed))
    method_cls = TRANSFER_METHODS.get(config.method.name)
    teacher, _ = load_checkpoint(str(teacher_folder))
    device = torch.device("cpu")
    source = build_teacher_source(config, teacher, "unused", splits, method_cls, "cached", device, data=data)
    assert source.cache.spec.autocast == "bfloat16"
    batch, replay_k = collate_views([data.dataset[(i, i + 5)] for i in range(0, 40, 5)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        online = teacher(batch.images).embedding.float()
    cached = source(batch, replay_k).embedding
    storage = 2**-10 * online.abs().max()  # one fp16 unit in the last place at the largest value
    assert (cached - online).abs().max() <= storage
    fp32_config = _config(teacher_folder, tmp_path / "cache", "train.mixed_precision=no")
    fp32 = build_teacher_source(fp32_config, teacher, "unused", splits, method_cls, "cached", device, data=data)
    assert (fp32(batch, replay_k).embedding - online).abs().max() > 4 * storage  # the test can fail
    # the cache is checked against the dataset on every use: another crop scale is refused
    wrong = build_train_data(splits, _config(teacher_folder, tmp_path / "cache", "train.crop_scale=[0.2,1.0]").train)
    with pytest.raises(ConfigError, match="does not replay"):
        build_teacher_source(config, teacher, "unused", splits, method_cls, "cached", device, data=wrong)


def test_an_interrupted_build_resumes_from_its_finished_chunks(teacher, tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (7, 20, 20, 3), dtype=np.uint8)
    collection = ArrayImageCollection(images, [f"i{i}" for i in range(7)], [0] * 7)
    whole = build_cache(teacher, collection, SPEC, tmp_path / "whole" / "c.safetensors", progress=False)
    calls = []
    original = cache_module.run_teacher

    def interrupted(*args, **kwargs):
        calls.append(args[-2:])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "run_teacher", interrupted)
    path = tmp_path / "resumed" / "c.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, collection, SPEC, path, progress=False, chunk_images=2)
    assert not path.exists() and len(list((tmp_path / "resumed" / "c.partial").iterdir())) == 2
    calls.clear()
    resumed = build_cache(teacher, collection, SPEC, path, progress=False, chunk_images=2)
    assert calls == [(4, 6), (6, 7)]  # only the chunks that were not finished
    assert torch.equal(resumed.embeddings, whole.embeddings)
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.safetensors"]


def test_refreshed_generations_replay_new_views_exactly(teacher, tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (4, 20, 24, 3), dtype=np.uint8)
    collection = ArrayImageCollection(images, [f"i{i}" for i in range(4)], [0, 1, 0, 1])
    replay = ReplaySpec(2, SPEC.seed, refresh_draws=10)
    dataset = TrainDataset(collection, 16, views=2, seed=1, scale=SPEC.scale, replay=replay)
    loads = []

    def load(generation):
        loads.append(generation)
        return _load(teacher, collection, tmp_path, SPEC.for_generation(generation))

    cache = RefreshingCache(load, load(0))
    cache.check_dataset(dataset)
    for draw in (0, 12, 25):
        batch, replay_k = collate_views([dataset[(i, draw + i)] for i in range(4)])
        assert set((replay_k // 2).tolist()) == {draw // 10}
        with torch.no_grad():
            online = teacher(batch.images).embedding
        torch.testing.assert_close(cache.lookup(batch.indices, replay_k).embedding, online, rtol=1e-3, atol=1e-3)
    assert loads == [0, 1, 2]
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 3
    describe = describe_cache(next(tmp_path.glob("teacher-*.safetensors")))
    assert describe["spec"]["mode"] == "cached"


def test_a_short_default_run_builds_no_cache(teacher_folder, tmp_path):
    common = ["transfer", "train", "--teacher", str(teacher_folder), "--student", "resnet18-8", "--dataset", "glyphs"]
    common += ["--set", "data.options.max_classes=16", "--image-size", "16", "--batch-size", "16", "--ipc", "4"]
    common += ["--max-steps", "1", "--no-progress", "--set", "eval.nmi=false", "--set", "train.eval_at_start=false"]
    common += ["--set", f"teacher.cache_dir={tmp_path / 'cache'}"]
    code, stdout, stderr = _cli(*common, "--out", str(tmp_path / "auto"))
    assert code == 0, stderr
    assert "teacher mode: online" in stdout and not (tmp_path / "cache").exists()
    code, stdout, stderr = _cli(*common, "--out", str(tmp_path / "cached"), "--teacher-mode", "cached")
    assert code == 0, stderr
    assert "teacher mode: cached" in stdout and len(list((tmp_path / "cache").glob("teacher-*"))) == 1
