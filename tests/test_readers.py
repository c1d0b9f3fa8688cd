"""Dataset readers on tiny fixtures in the real on-disk formats (JPEGs, cars_annos.mat, text lists)."""

from __future__ import annotations

import inspect
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dmlkd.data.base import ArrayImageCollection, DatasetSplits, FileImageCollection
from dmlkd.data.checks import describe, drop_bad_images, find_bad_images
from dmlkd.data.readers import read_cars, read_csv, read_cub, read_folder, read_inshop, read_sop, remap_labels
from dmlkd.errors import ConfigError, DataError
from dmlkd.registry import DATASETS


def _jpeg_bytes(size: int = 8, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg_bytes()


def _write(path: Path, data: bytes = JPEG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _labels_by_id(collection) -> dict[str, int]:
    return dict(zip(collection.identifiers, collection.labels.tolist()))


# ---------------------------------------------------------------- CUB


def _make_cub(tmp_path: Path, num_classes: int = 200) -> Path:
    images = tmp_path / "CUB_200_2011" / "images"
    for k in range(1, num_classes + 1):
        _write(images / f"{k:03d}.Bird_{k}" / f"Bird_{k}_0001.jpg")
    _write(images / "001.Bird_1" / "Bird_1_0002.jpg")
    _write(images / "001.Bird_1" / "._Bird_1_0001.jpg", b"\x00\x05\x16\x07AppleDouble")
    _write(images / "150.Bird_150" / "._Bird_150_0001.jpg", b"junk")
    (images / "002.Bird_2" / "notes.txt").write_text("not an image")
    return tmp_path


def test_cub_labels_follow_sorted_folders_and_split_by_class(tmp_path):
    root = _make_cub(tmp_path)
    splits = read_cub(root, verify_counts=False)
    assert splits.name == "cub" and splits.recall_ks == (1, 2, 4, 8) and splits.query is None
    assert len(splits.train) == 101 and len(splits.test) == 100
    assert sorted(set(splits.train.labels.tolist())) == list(range(100))
    assert sorted(set(splits.test.labels.tolist())) == list(range(100, 200))
    train = _labels_by_id(splits.train)
    assert train["images/001.Bird_1/Bird_1_0001.jpg"] == 0 and train["images/100.Bird_100/Bird_100_0001.jpg"] == 99
    assert _labels_by_id(splits.test)["images/101.Bird_101/Bird_101_0001.jpg"] == 100
    assert not any("._" in name or name.endswith(".txt") for name in splits.train.identifiers + splits.test.identifiers)
    assert splits.train.load(0).mode == "RGB"
    # root may also be the CUB_200_2011 folder itself
    direct = read_cub(root / "CUB_200_2011", verify_counts=False)
    assert direct.train.identifiers == splits.train.identifiers


def test_cub_counts_are_verified_by_default(tmp_path):
    root = _make_cub(tmp_path)
    with pytest.raises(DataError) as error:
        read_cub(root)
    message = str(error.value)
    assert "\n" not in message
    assert "train: expected 5,864 images / 100 classes, found 101 images / 100 classes" in message
    assert "test: expected 5,924 images / 100 classes, found 100 images / 100 classes" in message
    assert "verify_counts=False" in message


def test_cub_missing_root_or_images_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist or is not a folder.*CUB_200_2011.tgz"):
        read_cub(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"CUB_200_2011/images'? does not exist.*CUB_200_2011.tgz"):
        read_cub(tmp_path)
    with pytest.raises(DataError, match=r"needs a data root"):
        read_cub(None)


def test_cub_partial_download_reports_counts_not_empty_split(tmp_path):
    root = _make_cub(tmp_path, num_classes=60)
    with pytest.raises(DataError, match=r"test: expected 5,924 images / 100 classes, found 0 images / 0 classes"):
        read_cub(root)
    with pytest.raises(DataError, match=r"no test images"):
        read_cub(root, verify_counts=False)


# ---------------------------------------------------------------- Cars


CARS_FIELDS = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]


def _make_cars(tmp_path: Path, classes=(1, 1, 2, 98, 99, 99, 196), folder: str = "cars196") -> Path:
    base = tmp_path / folder
    annotations = np.zeros((1, len(classes)), dtype=[(name, "O") for name in CARS_FIELDS])
    for k, label in enumerate(classes):
        relpath = f"car_ims/{k + 1:06d}.jpg"
        _write(base / relpath)
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 2, 7, 8)]
        flag = np.array([[k % 2]], dtype=np.uint8)  # the official flag mixes classes; it must be ignored
        annotations[0, k] = (np.array([relpath]), *box, np.array([[label]], dtype=np.uint8), flag)
    class_names = np.empty((1, 196), dtype=object)
    class_names[0, :] = [f"Make Model {k}" for k in range(1, 197)]
    scipy.io.savemat(str(base / "cars_annos.mat"), {"annotations": annotations, "class_names": class_names})
    return tmp_path


def test_cars_reads_savemat_struct_and_splits_by_class(tmp_path):
    root = _make_cars(tmp_path)
    loaded = scipy.io.loadmat(str(root / "cars196" / "cars_annos.mat"))["annotations"][0]
    assert str(loaded[0][0][0]) == "car_ims/000001.jpg" and int(loaded[0][5][0][0]) == 1  # the real file's layout
    splits = read_cars(root, verify_counts=False)
    assert _labels_by_id(splits.train) == {
        "car_ims/000001.jpg": 0,
        "car_ims/000002.jpg": 0,
        "car_ims/000003.jpg": 1,
        "car_ims/000004.jpg": 97,
    }
    assert _labels_by_id(splits.test) == {
        "car_ims/000005.jpg": 98,
        "car_ims/000006.jpg": 98,
        "car_ims/000007.jpg": 195,
    }
    assert splits.recall_ks == (1, 2, 4, 8)
    assert splits.test.load(2).size == (8, 8)
    assert read_cars(root / "cars196", verify_counts=False).train.identifiers == splits.train.identifiers
    # class names from the annotation file's class_names (class k is label k - 1)
    assert (splits.train.class_name(0), splits.test.class_name(195)) == ("Make Model 1", "Make Model 196")


def test_cars_counts_missing_annotations_and_missing_images(tmp_path):
    root = _make_cars(tmp_path)
    with pytest.raises(DataError, match=r"train: expected 8,054 images / 98 classes, found 4 images / 3 classes"):
        read_cars(root)
    (root / "cars196" / "car_ims" / "000007.jpg").unlink()
    with pytest.raises(DataError, match=r"000007.jpg' listed in cars_annos.mat does not exist"):
        read_cars(root, verify_counts=False)
    (root / "cars196" / "cars_annos.mat").unlink()
    with pytest.raises(DataError, match=r"cars196/cars_annos.mat' does not exist.*car_ims.tgz"):
        read_cars(root)


def test_cars_unreadable_mat_file(tmp_path):
    _write(tmp_path / "cars196" / "cars_annos.mat", b"not a mat file at all")
    with pytest.raises(DataError, match=r"cannot read annotations from"):
        read_cars(tmp_path, verify_counts=False)


# ---------------------------------------------------------------- SOP


def _make_sop(tmp_path: Path) -> Path:
    base = tmp_path / "Stanford_Online_Products"
    train = [
        (1, 7, 1, "bicycle_final/a_0.JPG"),
        (2, 7, 1, "bicycle_final/a_1.JPG"),
        (3, 3, 2, "chair_final/b_0.JPG"),
        (4, 12, 2, "chair_final/c_0.JPG"),
    ]
    test = [
        (5, 40, 1, "bicycle_final/d_0.JPG"),
        (6, 25, 3, "sofa_final/e_0.JPG"),
        (7, 25, 3, "sofa_final/e_1.JPG"),
    ]
    for name, rows in (("train", train), ("test", test)):
        lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, row)) for row in rows]
        _write(base / f"Ebay_{name}.txt", ("\n".join(lines) + "\n").encode())
        for row in rows:
            _write(base / row[3])
    return tmp_path


def test_sop_reads_lists_and_remaps_labels_per_split(tmp_path):
    root = _make_sop(tmp_path)
    splits = read_sop(root, verify_counts=False)
    assert splits.recall_ks == (1, 10, 100, 1000)
    assert _labels_by_id(splits.train) == {
        "bicycle_final/a_0.JPG": 1,
        "bicycle_final/a_1.JPG": 1,
        "chair_final/b_0.JPG": 0,
        "chair_final/c_0.JPG": 2,
    }
    assert _labels_by_id(splits.test) == {
        "bicycle_final/d_0.JPG": 1,
        "sofa_final/e_0.JPG": 0,
        "sofa_final/e_1.JPG": 0,
    }
    assert read_sop(root / "Stanford_Online_Products", verify_counts=False).test.identifiers == splits.test.identifiers
    assert splits.train.class_name(1).startswith("bicycle ") and splits.test.class_name(0).startswith("sofa ")
    with pytest.raises(DataError, match=r"train: expected 59,551 images / 11,318 classes, found 4 images / 3 classes"):
        read_sop(root)


def test_sop_missing_and_malformed_lists(tmp_path):
    root = _make_sop(tmp_path)
    (root / "Stanford_Online_Products" / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 x 1\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt' line 2: expected 'image_id class_id super_class_id path'"):
        read_sop(root, verify_counts=False)
    (root / "Stanford_Online_Products" / "Ebay_test.txt").unlink()
    with pytest.raises(DataError, match=r"annotation file .*Ebay_test.txt' does not exist.*Stanford_Online_Products"):
        read_sop(root)
    with pytest.raises(DataError, match=r"Stanford_Online_Products/Ebay_train.txt' does not exist"):
        read_sop(tmp_path / "Stanford_Online_Products" / "bicycle_final")


# ---------------------------------------------------------------- In-shop

INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
    ("img/WOMEN/Skirts/id_00000001/02_1_front.jpg", "id_00000001", "train"),
    ("img/MEN/Tees/id_00000500/01_1_front.jpg", "id_00000500", "query"),
    ("img/MEN/Tees/id_00000300/01_1_front.jpg", "id_00000300", "query"),
    ("img/MEN/Tees/id_00000500/01_2_side.jpg", "id_00000500", "gallery"),
    ("img/MEN/Tees/id_00000300/01_3_back.jpg", "id_00000300", "gallery"),
    ("img/MEN/Tees/id_00000700/01_1_front.jpg", "id_00000700", "gallery"),
]


def _make_inshop(tmp_path: Path, layout: str = "Img/img", rows=INSHOP_ROWS) -> Path:
    base = tmp_path / "Inshop_Clothes"
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    lines += [f"{path:<60}{item} {status}" for path, item, status in rows]
    _write(base / "Eval" / "list_eval_partition.txt", ("\n".join(lines) + "\n").encode())
    for path, _, _ in rows:
        _write(base / layout / path.split("/", 1)[1])
    return tmp_path


@pytest.mark.parametrize("layout", ["Img/img", "img", "Img"])
def test_inshop_query_gallery_joint_remap(tmp_path, layout):
    splits = read_inshop(_make_inshop(tmp_path, layout), verify_counts=False)
    assert splits.recall_ks == (1, 10, 20, 30, 40, 50)
    assert splits.train.labels.tolist() == [1, 1, 2, 0]
    assert splits.query.labels.tolist() == [1, 0]  # items 500, 300 among {300, 500, 700}
    assert splits.gallery.labels.tolist() == [1, 0, 2]
    assert len(splits.test) == 5 and splits.test.labels.tolist() == [1, 0, 1, 0, 2]
    assert splits.test.identifiers[:2] == splits.query.identifiers
    assert splits.test.identifiers[2:] == splits.gallery.identifiers
    assert splits.query.identifiers[0].endswith("MEN/Tees/id_00000500/01_1_front.jpg")
    assert splits.gallery.load(2).mode == "RGB" and splits.train.load(3).size == (8, 8)


def test_inshop_counts_and_errors(tmp_path):
    root = _make_inshop(tmp_path)
    with pytest.raises(DataError) as error:
        read_inshop(root)
    message = str(error.value)
    assert "train: expected 25,882 images / 3,997 classes, found 4 images / 3 classes" in message
    assert "query: expected 14,218 images, found 2 images" in message
    assert "gallery: expected 12,612 images" in message and "test: expected 26,830 images / 3,985 classes" in message
    partition = root / "Inshop_Clothes" / "Eval" / "list_eval_partition.txt"
    partition.write_text("1\nimage_name item_id evaluation_status\nimg/a.jpg id_00000001 validation\n")
    with pytest.raises(DataError, match=r"line 3: expected 'image_name id_NNNNNNNN train\|query\|gallery'"):
        read_inshop(root, verify_counts=False)
    partition.unlink()
    with pytest.raises(DataError, match=r"Eval/list_eval_partition.txt' does not exist.*DeepFashion"):
        read_inshop(root)


def test_inshop_images_not_extracted(tmp_path):
    root = _make_inshop(tmp_path)
    shutil.rmtree(root / "Inshop_Clothes" / "Img")
    with pytest.raises(DataError, match=r"02_1_front.jpg' of list_eval_partition.txt not found .*unzip Img/img.zip"):
        read_inshop(root, verify_counts=False)


# ---------------------------------------------------------------- folder


def _make_folder(tmp_path: Path, classes: int = 6) -> Path:
    for k in range(classes):
        _write(tmp_path / f"class_{k}" / "a.jpg")
        _write(tmp_path / f"class_{k}" / "b.JPEG")
    _write(tmp_path / "class_0" / "nested" / "c.jpg")
    _write(tmp_path / "class_0" / ".hidden.jpg")
    _write(tmp_path / "class_0" / "._a.jpg", b"junk")
    (tmp_path / "class_1" / "readme.md").write_text("x")
    (tmp_path / "empty_class").mkdir()
    _write(tmp_path / ".cache" / "x.jpg")
    return tmp_path


def test_folder_reader_splits_sorted_classes(tmp_path):
    splits = read_folder(_make_folder(tmp_path))
    assert splits.train.num_classes == 3 and splits.test.num_classes == 3
    train = _labels_by_id(splits.train)
    assert train == {
        "class_0/a.jpg": 0,
        "class_0/b.JPEG": 0,
        "class_0/nested/c.jpg": 0,
        "class_1/a.jpg": 1,
        "class_1/b.JPEG": 1,
        "class_2/a.jpg": 2,
        "class_2/b.JPEG": 2,
    }
    assert sorted(set(splits.test.labels.tolist())) == [3, 4, 5]
    assert read_folder(tmp_path, train_classes=4).train.num_classes == 4
    assert read_folder(tmp_path, train_classes=0.34).train.num_classes == 2
    assert DATASETS.build("folder", root=tmp_path).test.identifiers == splits.test.identifiers


def test_folder_reader_errors(tmp_path):
    _make_folder(tmp_path, classes=3)
    with pytest.raises(DataError, match=r"3 class folders with images split into 2 train / 1 test"):
        read_folder(tmp_path)
    with pytest.raises(DataError, match=r"is not a folder"):
        read_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"fraction in"):
        read_folder(tmp_path, train_classes=1.5)
    # Option types are checked by the registry, before any file is read.
    with pytest.raises(ConfigError, match=r"dataset 'folder' option train_classes: expected an integer, got True"):
        DATASETS.build("folder", tmp_path, train_classes=True)
    with pytest.raises(ConfigError, match=r"unknown option 'seed' for dataset 'folder'; valid options: train_classes"):
        DATASETS.build("folder", tmp_path, seed=1)
    with pytest.raises(ConfigError, match=r"dataset 'cub' option verify_counts: expected true or false, got 'no'"):
        DATASETS.build("cub", tmp_path, verify_counts="no")


# ---------------------------------------------------------------- CSV


def _make_csv(tmp_path: Path, lines: list[str], name: str = "data.csv") -> Path:
    for stem in ("a", "b", "c", "d", "e", "f"):
        _write(tmp_path / "imgs" / f"{stem}.jpg")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_reader_without_and_with_query_gallery(tmp_path):
    absolute = tmp_path / "imgs" / "f.jpg"
    path = _make_csv(
        tmp_path,
        [
            "path,label,split,note",
            "imgs/a.jpg,zebra,train,x",
            "imgs/b.jpg,ant,train,",
            "imgs/c.jpg,10,test,",
            "imgs/d.jpg,9,test,",
            f"{absolute},10,test,",
        ],
    )
    splits = read_csv(path)
    assert splits.query is None and splits.gallery is None
    assert _labels_by_id(splits.train) == {"imgs/a.jpg": 1, "imgs/b.jpg": 0}
    assert splits.test.labels.tolist() == [1, 0, 1]  # numeric order: 9 < 10
    assert splits.test.load(2).size == (8, 8)
    flagged = _make_csv(
        tmp_path,
        [
            "path,label,split,is_query,is_gallery",
            "imgs/a.jpg,x,train,,",
            "imgs/b.jpg,y,train,,",
            "imgs/c.jpg,p,test,1,0",
            "imgs/d.jpg,q,test,yes,no",
            "imgs/e.jpg,p,test,False,TRUE",
            "imgs/f.jpg,r,test,0,1",
        ],
        "flagged.csv",
    )
    splits = DATASETS.build("csv", root=flagged)
    assert splits.query.identifiers == ["imgs/c.jpg", "imgs/d.jpg"] and splits.query.labels.tolist() == [0, 1]
    assert splits.gallery.identifiers == ["imgs/e.jpg", "imgs/f.jpg"] and splits.gallery.labels.tolist() == [
        0,
        2,
    ]
    assert len(splits.test) == 4


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (["path,label", "imgs/a.jpg,x"], "missing column.*split in header 'path,label'"),
        (["path,label,split,is_query", "imgs/a.jpg,x,train,1"], "missing column.*is_gallery"),
        (
            ["path,label,split", "imgs/a.jpg,x,train", "imgs/b.jpg,y,val"],
            "line 3: unknown split 'val'; valid: test, train",
        ),
        (
            ["path,label,split", "imgs/a.jpg,x,train", "imgs/zz.jpg,y,test", "imgs/yy.jpg,y,test"],
            "2 image path.*do not exist, first 'imgs/zz.jpg' on line 3",
        ),
        (
            ["path,label,split,is_query,is_gallery", "imgs/a.jpg,x,train,,", "imgs/b.jpg,y,test,maybe,0"],
            "line 3: is_query='maybe' is not a boolean; use one of 0, 1, true, false, yes, no",
        ),
        (["path,label,split", "imgs/a.jpg,x,test", "imgs/b.jpg,y,test"], "no rows with split=train"),
        (["path,label,split", "imgs/a.jpg,x,train"], "no rows with split=test"),
        (
            ["path,label,split,is_query,is_gallery", "imgs/a.jpg,x,train,,", "imgs/b.jpg,y,test,1,1"],
            "line 3: a test image is either a query or a gallery item",
        ),
    ],
)
def test_csv_reader_errors(tmp_path, lines, pattern):
    path = _make_csv(tmp_path, lines)
    with pytest.raises(DataError, match=pattern) as error:
        read_csv(path)
    assert "data.csv" in str(error.value) and "\n" not in str(error.value)


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"CSV file .*nope.csv' does not exist"):
        read_csv(tmp_path / "nope.csv")


# ---------------------------------------------------------------- bad images and checks


def _corrupt_folder(tmp_path: Path) -> tuple[Path, Path]:
    _make_folder(tmp_path, classes=4)
    truncated = _write(tmp_path / "class_1" / "truncated.jpg", _jpeg_bytes(64)[:700])
    empty = _write(tmp_path / "class_3" / "empty.jpg", b"")
    return truncated, empty


def test_corrupt_and_empty_images_raise_data_error_naming_the_file(tmp_path):
    truncated, empty = _corrupt_folder(tmp_path)
    splits = read_folder(tmp_path, train_classes=2)
    for collection, path in ((splits.train, truncated), (splits.test, empty)):
        index = collection.identifiers.index(path.relative_to(tmp_path).as_posix())
        with pytest.raises(DataError, match=path.name):
            collection.load(index)


def test_find_and_drop_bad_images(tmp_path):
    _corrupt_folder(tmp_path)
    splits = read_folder(tmp_path, train_classes=2)
    assert [name for name, _ in find_bad_images(splits.train)] == ["class_1/truncated.jpg"]
    assert [name for name, _ in find_bad_images(splits.test, workers=2)] == ["class_3/empty.jpg"]
    cleaned, bad = drop_bad_images(splits)
    assert [name for name, _ in bad] == ["class_1/truncated.jpg", "class_3/empty.jpg"]
    assert all("truncated.jpg" in reason or "empty.jpg" in reason for _, reason in bad)
    assert len(cleaned.train) == len(splits.train) - 1 and len(cleaned.test) == len(splits.test) - 1
    assert find_bad_images(cleaned.train) == [] and find_bad_images(cleaned.test) == []
    assert describe(cleaned)["splits"] == {
        "train": {"images": 5, "classes": 2},
        "test": {"images": 4, "classes": 2},
    }
    again, none = drop_bad_images(cleaned)
    assert none == [] and again.train is cleaned.train


def test_drop_bad_images_keeps_query_gallery_views_consistent(tmp_path):
    root = _make_inshop(tmp_path)
    _write(root / "Inshop_Clothes" / "Img" / "img" / "MEN/Tees/id_00000300/01_3_back.jpg", b"")
    splits = read_inshop(root, verify_counts=False)
    cleaned, bad = drop_bad_images(splits)
    assert [name for name, _ in bad] == ["img/MEN/Tees/id_00000300/01_3_back.jpg"]
    assert len(cleaned.query) == 2 and len(cleaned.gallery) == 2 and len(cleaned.test) == 4
    assert cleaned.gallery.labels.tolist() == [1, 2] and cleaned.gallery.load(1).mode == "RGB"
    info = describe(cleaned)
    assert info["dataset"] == "inshop" and info["recall_ks"] == [1, 10, 20, 30, 40, 50]
    assert info["splits"]["query"] == {"images": 2, "classes": 2}


def test_find_bad_images_on_memory_collection_and_all_bad_split(tmp_path):
    memory = ArrayImageCollection(np.zeros((2, 4, 4), dtype=np.uint8), ["m:0", "m:1"], [0, 1])
    assert find_bad_images(memory) == []
    _write(tmp_path / "x.jpg", b"")
    broken = FileImageCollection(tmp_path, ["x.jpg"], [0])
    with pytest.raises(DataError, match=r"none of the 1 train images is readable"):
        drop_bad_images(DatasetSplits("tiny", broken, memory))


def test_inshop_declared_count_must_match(tmp_path):
    root = _make_inshop(tmp_path)
    partition = root / "Inshop_Clothes" / "Eval" / "list_eval_partition.txt"
    partition.write_text("52712\n" + partition.read_text().split("\n", 1)[1])
    with pytest.raises(DataError, match=r"declares 52,712 images on line 1 but lists 9"):
        read_inshop(root, verify_counts=False)


def test_remap_labels_sorts_numerically_and_keeps_distinct_strings():
    assert remap_labels([10, 9, 10, 200]).tolist() == [1, 0, 1, 2]
    assert remap_labels(["10", "9", "01", "1"]).tolist() == [3, 2, 0, 1]
    assert remap_labels(["b", "a", "10", "b"]).tolist() == [2, 1, 0, 2]


def test_registered_readers_keep_their_signature_and_docstring():
    for name in ("cub", "cars", "sop", "inshop"):
        builder = DATASETS.get(name)
        assert list(inspect.signature(builder).parameters) == ["root", "verify_counts"]
        assert inspect.signature(builder).parameters["verify_counts"].default is True
        assert builder.__doc__
    assert list(inspect.signature(DATASETS.get("folder")).parameters) == ["root", "train_classes"]
    assert list(inspect.signature(DATASETS.get("csv")).parameters) == ["root"]


def test_csv_short_row_and_byte_order_mark(tmp_path):
    path = _make_csv(tmp_path, ["path,label,split", "imgs/a.jpg,x,train", "imgs/b.jpg,y"])
    with pytest.raises(DataError, match=r"line 3: 2 values, expected one per header column"):
        read_csv(path)
    path.write_text("\ufeffPath,Label,Split\nimgs/a.jpg,x,train\nimgs/b.jpg,y,Test\n", encoding="utf-8")
    splits = read_csv(path)
    assert splits.train.identifiers == ["imgs/a.jpg"] and splits.test.identifiers == ["imgs/b.jpg"]
