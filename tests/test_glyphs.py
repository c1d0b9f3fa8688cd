"""The built-in glyphs demo dataset: classes, determinism, cache behaviour, splits."""

from __future__ import annotations

import inspect
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from dmlkd import paths
from dmlkd.data import glyphs
from dmlkd.errors import ConfigError
from dmlkd.registry import DATASETS

SMALL = {"max_classes": 6, "render_size": 16}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("glyph-cache")
    return root, glyphs.build_glyphs(root, **SMALL)


@pytest.fixture(scope="module")
def full_classes() -> list[int]:
    paths = glyphs.font_paths()
    return glyphs.select_classes(
        glyphs.GlyphRenderer(paths, glyphs.DETECT_SIZE), glyphs.candidate_codepoints(paths), None
    )


def _all_images(splits) -> np.ndarray:
    return np.concatenate([splits.train.images, splits.test.images])


def test_registered_as_dataset_with_its_options():
    assert DATASETS.get("glyphs") is glyphs.build_glyphs
    parameters = inspect.signature(glyphs.build_glyphs).parameters
    assert [name for name in parameters if name != "root"] == [
        "render_size",
        "renders_per_face",
        "seed",
        "max_classes",
    ]


def test_candidates_are_undecomposed_letters_and_digits_of_all_faces():
    candidates = glyphs.candidate_codepoints(glyphs.font_paths())
    assert 300 <= len(candidates) <= 400  # 345 with matplotlib's current fonts
    assert candidates == sorted(candidates)
    assert all(unicodedata.category(chr(c))[0] in "LN" for c in candidates)
    assert ord("A") in candidates and ord("À") not in candidates  # À decomposes into A + grave


def test_homoglyphs_keep_only_the_lowest_codepoint(full_classes):
    kept = set(full_classes)
    for group in [
        "AΑА",
        "BΒВ",
        "EΕЕ",
        "HΗН",
        "IΙІ",
        "MΜМ",
        "OΟО",
        "PΡР",
        "TΤТ",
        "XΧХ",
        "oοо",
        "eе",
        "aа",
        "pр",
    ]:
        assert [ch for ch in group if ord(ch) in kept] == [group[0]], group
    for distinct in "OQ0DÐbdpqnhШΘ":  # close but different drawings survive
        assert ord(distinct) in kept, distinct
    assert 250 <= len(full_classes) < 345


def test_no_two_classes_drawn_alike_in_the_default_face(full_classes):
    renderer = glyphs.GlyphRenderer(glyphs.font_paths(), glyphs.DETECT_SIZE)
    face = glyphs.FACES.index(glyphs.DEFAULT_FACE)
    ink = (255.0 - np.stack([renderer.render(face, c) for c in full_classes]).reshape(len(full_classes), -1)) / 255
    assert len({image.tobytes() for image in ink}) == len(full_classes)
    total = ink.sum(1)
    for i in range(len(full_classes)):
        distance = np.abs(ink[i + 1 :] - ink[i]).sum(1) / (total[i + 1 :] + total[i])
        assert distance.size == 0 or distance.min() >= glyphs.HOMOGLYPH_THRESHOLD


def test_split_shapes_labels_and_identifiers(small):
    _, splits = small
    faces, repeats = len(glyphs.FACES), 2
    assert splits.name == "glyphs" and splits.recall_ks == (1, 2, 4, 8)
    assert len(splits.train) == len(splits.test) == 3 * faces * repeats
    assert splits.train.images.shape[1:] == (16, 16) and splits.train.images.dtype == np.uint8
    assert sorted(set(splits.train.labels)) == [0, 1, 2] and sorted(set(splits.test.labels)) == [3, 4, 5]
    assert splits.train.identifiers[0] == f"glyphs:U+0030:{glyphs.FACES[0]}:0"
    assert splits.train.identifiers[1] == f"glyphs:U+0030:{glyphs.FACES[0]}:1"
    train_codes = {name.split(":")[1] for name in splits.train.identifiers}
    test_codes = {name.split(":")[1] for name in splits.test.identifiers}
    assert not train_codes & test_codes and max(train_codes) < min(test_codes)
    assert len(set(splits.train.identifiers + splits.test.identifiers)) == 2 * len(splits.train)
    image = splits.test.load(0)
    assert image.mode == "RGB" and image.size == (16, 16)
    assert splits.defaults["image_size"] == 16 and splits.defaults["flip_p"] == 0.0


def test_glyphs_are_dark_on_white_and_mostly_inside(small):
    images = _all_images(small[1])
    assert (images[:, 0, :] > 200).mean() > 0.9 and (images[:, :, -1] > 200).mean() > 0.9  # border is paper
    assert (images.reshape(len(images), -1).min(1) < 100).all()  # every image has ink


def test_same_seed_same_arrays_different_seed_differs(small, tmp_path: Path):
    _, splits = small
    again = glyphs.build_glyphs(tmp_path / "a", **SMALL)
    np.testing.assert_array_equal(_all_images(again), _all_images(splits))
    other = glyphs.build_glyphs(tmp_path / "b", seed=1, **SMALL)
    assert not np.array_equal(_all_images(other), _all_images(splits))
    assert other.train.identifiers == splits.train.identifiers  # same classes, other distortions


def test_renders_per_face_and_distortions_differ(tmp_path: Path):
    splits = glyphs.build_glyphs(tmp_path, max_classes=2, render_size=16, renders_per_face=3)
    assert len(splits.train) == len(glyphs.FACES) * 3
    renders = splits.train.images.reshape(len(glyphs.FACES), 3, -1)
    assert not np.array_equal(renders[0, 0], renders[0, 1]) and not np.array_equal(renders[0, 1], renders[0, 2])


def test_cache_hit_does_not_render(small, monkeypatch: pytest.MonkeyPatch):
    root, splits = small
    files = sorted(root.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    mtime = files[0].stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rendered despite a valid cache")

    monkeypatch.setattr(glyphs, "render_instances", fail)
    monkeypatch.setattr(glyphs, "select_classes", fail)
    cached = glyphs.build_glyphs(root, **SMALL)
    np.testing.assert_array_equal(_all_images(cached), _all_images(splits))
    assert sorted(root.iterdir()) == files and files[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("garbage", [b"", b"not a zip file", b"PK\x03\x04truncated"])
def test_corrupt_cache_is_rebuilt(small, tmp_path: Path, garbage: bytes):
    root, splits = small
    (tmp_path / next(root.iterdir()).name).write_bytes(garbage)
    rebuilt = glyphs.build_glyphs(tmp_path, **SMALL)
    np.testing.assert_array_equal(_all_images(rebuilt), _all_images(splits))
    files = list(tmp_path.iterdir())
    assert len(files) == 1  # replaced in place, no temporary file left behind
    with np.load(files[0]) as data:
        assert data["renders"].shape[0] == 6


def test_cache_with_foreign_key_is_rebuilt(small, tmp_path: Path):
    root, splits = small
    name = next(root.iterdir()).name
    other = glyphs.build_glyphs(tmp_path / "other", max_classes=4, render_size=16)
    next((tmp_path / "other").iterdir()).rename(tmp_path / name)  # right name, wrong content
    rebuilt = glyphs.build_glyphs(tmp_path, **SMALL)
    assert len(other.train) != len(rebuilt.train)
    np.testing.assert_array_equal(_all_images(rebuilt), _all_images(splits))


def test_cache_key_depends_on_options():
    paths = glyphs.font_paths()
    candidates = glyphs.candidate_codepoints(paths)
    keys = {
        glyphs.cache_key(paths, candidates, glyphs.GlyphOptions(**options))
        for options in [{}, {"seed": 1}, {"render_size": 40}, {"renders_per_face": 3}, {"max_classes": 9}]
    }
    assert len(keys) == 5
    assert glyphs.cache_key(paths, candidates[:-1], glyphs.GlyphOptions()) not in keys


def test_cache_folder_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("DMLKD_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_folder(tmp_path / "root") == tmp_path / "root"
    assert paths.cache_folder() == tmp_path / "explicit"
    monkeypatch.delenv("DMLKD_CACHE")
    assert paths.cache_folder() == tmp_path / "xdg" / "dmlkd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_folder() == tmp_path / "home" / ".cache" / "dmlkd"


def test_unwritable_cache_still_returns_data(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    splits = glyphs.build_glyphs(blocker / "cache", max_classes=2, render_size=16)
    assert len(splits.train) == len(glyphs.FACES) * 2


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"render_size": 4}, "render_size=4"),
        ({"max_classes": 1}, "max_classes=1"),
        ({"renders_per_face": 0}, "renders_per_face=0"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_options_are_one_line_config_errors(tmp_path: Path, options: dict, fragment: str):
    with pytest.raises(ConfigError, match=fragment) as error:
        glyphs.build_glyphs(tmp_path, **options)
    assert "\n" not in str(error.value)
