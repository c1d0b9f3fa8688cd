"""The pipeline report: results.json, report.md, the PNG figures and the paper table join."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.config import DataConfig, EvalConfig
from dmlkd.data.base import DatasetSplits, Subset
from dmlkd.data.catalog import build_splits
from dmlkd.errors import CheckpointError, ConfigError
from dmlkd.evaluation.run import evaluate_model
from dmlkd.models import create_model
from dmlkd.pipelines import paper
from dmlkd.pipelines.plots import ModelEmbeddings, grid_rows
from dmlkd.pipelines.report import (
    ReportEntry,
    checkpoint_folders,
    format_summary,
    read_history,
    run_folder,
    write_report,
)

PNGS = ("recall_per_epoch.png", "recall_at_k.png", "retrieval_grid.png")
EVAL = EvalConfig(batch_size=64)
CPU = torch.device("cpu")


def _metrics(epoch: int, r1: float) -> dict[str, float]:
    return {
        "epoch": epoch,
        "step": 10 * epoch,
        "recall@1": r1,
        "recall@2": r1 + 0.05,
        "recall@4": r1 + 0.1,
        "recall@8": r1 + 0.15,
        "map@r": r1 / 2,
        "nmi": 0.4 + epoch / 100,
    }


def _make_run(folder: Path, spec: str, stage: str, r1s: list[float], run: dict | None, seed: int) -> Path:
    """A run folder like the training loop writes: run.json, metrics.jsonl, last/ and best/."""
    torch.manual_seed(seed)
    model = create_model(spec)
    folder.mkdir(parents=True)
    history = [_metrics(epoch, r1) for epoch, r1 in enumerate(r1s, start=1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    if run is not None:
        (folder / "run.json").write_text(json.dumps({"stage": stage, "status": "finished", **run}))
    best = max(history, key=lambda row: row["recall@1"])
    train_config = {
        "stage": stage,
        "method": {"name": "relaxed_contrastive"},
        "loss": {"name": "proxy_anchor"},
    }
    save_checkpoint(folder / "last", model, train_config=train_config, metrics={**history[-1], "selected": "last"})
    save_checkpoint(folder / "best", model, train_config=train_config, metrics={**best, "selected": "best"})
    return folder


@pytest.fixture(scope="module")
def splits():
    return build_splits(DataConfig(name="glyphs", options={"max_classes": 8}))[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    teacher = _make_run(root / "teacher", "resnet18-16", "teacher", [0.3, 0.5, 0.45], {"train_seconds": 75.5}, 0)
    student = _make_run(
        root / "student",
        "resnet18-8",
        "transfer",
        [0.2, 0.4, 0.42],
        {"train_seconds": 12.0, "teacher_mode": "cached"},
        1,
    )
    torch.manual_seed(2)
    downloaded = root / "downloads" / "teacher-ckpt"
    save_checkpoint(downloaded, create_model("resnet18-16"), metrics={**_metrics(30, 0.61), "selected": "best"})
    return {"teacher": teacher, "student": student, "downloaded": downloaded}


@pytest.fixture(scope="module")
def cub_report(runs, splits, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pipeline-cub")
    entries = [
        ReportEntry("teacher", "teacher", runs["teacher"]),
        ReportEntry("relaxed_contrastive", "student", runs["student"], method="relaxed_contrastive"),
    ]
    results = write_report(out, "compress", "cub", splits, entries, EVAL, CPU, progress=False)
    return out, results


@pytest.fixture(scope="module")
def glyph_report(runs, splits, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pipeline-glyphs")
    entries = [
        ReportEntry("teacher", "teacher", runs["downloaded"]),
        ReportEntry("rkd", "student", runs["student"], method="rkd", teacher_mode="clean"),
    ]
    results = write_report(out, "self-transfer", "glyphs", splits, entries, EVAL, CPU, progress=False)
    return out, results


def test_report_writes_every_file(cub_report):
    out, _ = cub_report
    for name in ("results.json", "report.md", *PNGS):
        assert (out / name).is_file(), name


def test_results_json_fields(cub_report, runs):
    out, returned = cub_report
    results = json.loads((out / "results.json").read_text())
    assert results["entries"] == json.loads(json.dumps(returned["entries"]))
    assert (results["scenario"], results["dataset"], results["ks"]) == ("compress", "cub", [1, 2, 4, 8])
    assert {"torch", "device", "cpu_count"} <= set(results["machine"])
    teacher, student = results["entries"]
    assert teacher["last"]["recall@1"] == pytest.approx(0.45) and teacher["last"]["epoch"] == 3
    assert teacher["best"]["recall@1"] == pytest.approx(0.5) and teacher["best"]["epoch"] == 2
    assert teacher["best"]["selected_on"] == "test"
    assert {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"} <= set(student["last"])
    assert (teacher["embedding_dim"], student["embedding_dim"]) == (16, 8)
    for entry, spec in ((teacher, "resnet18-16"), (student, "resnet18-8")):
        assert entry["parameters"] == sum(p.numel() for p in create_model(spec).parameters())
        assert entry["throughput"]["images_per_second"] > 0
        assert entry["throughput"]["batch_size"] == 64
    assert (teacher["train_seconds"], student["train_seconds"]) == (75.5, 12.0)
    assert (teacher["teacher_mode"], student["teacher_mode"]) == (None, "cached")
    assert (teacher["method"], student["method"]) == ("proxy_anchor", "relaxed_contrastive")


def test_recall_curve_is_a_real_evaluation_of_the_last_checkpoint(cub_report, runs, splits):
    from dmlkd.checkpoints.io import load_checkpoint

    _, results = cub_report
    student = results["entries"][1]
    expected = evaluate_model(load_checkpoint(runs["student"] / "last")[0], splits, EVAL, CPU, progress=False)
    assert student["here"]["recall@1"] == pytest.approx(expected["recall@1"])
    assert student["here"]["map@r"] == pytest.approx(expected["map@r"])
    curve = [student["recall_curve"][str(k)] for k in results["curve_ks"]]
    assert results["curve_ks"][:4] == [1, 2, 3, 4] and max(results["curve_ks"]) == 32
    assert curve == sorted(curve) and curve[0] == pytest.approx(expected["recall@1"])


def test_pngs_open_with_sane_sizes(cub_report):
    out, _ = cub_report
    for name in PNGS:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            width, height = image.size
            assert image.format == "PNG"
            assert 300 <= width <= 3000 and 300 <= height <= 3000, (name, image.size)
            assert len(np.unique(np.asarray(image.convert("L")))) > 10, f"{name} looks blank"


def test_markdown_mentions_entries_and_links_pngs(cub_report):
    out, _ = cub_report
    text = (out / "report.md").read_text()
    for name in ("teacher", "relaxed_contrastive", "proxy_anchor"):
        assert name in text
    for name in PNGS:
        assert f"]({name})" in text
    assert "on the test split" in text and "teacher mode **cached**" in text


def test_cub_label_joins_the_paper_table_with_typo_marks(cub_report):
    out, results = cub_report
    teacher, student = results["entries"]
    assert teacher["paper"]["recall"] == {"1": 69.9, "2": 79.6, "4": 88.6}
    assert teacher["paper"]["suspect_ks"] == [4] and "86.6" in teacher["paper"]["note"]
    assert student["paper"]["recall"] == {"1": 66.6, "2": 78.1, "4": 85.9}
    text = (out / "report.md").read_text()
    assert "Compared with the paper" in text and "88.6*" in text and "66.6 / 78.1 / 85.9" in text
    assert "66.6" in format_summary(results)


def test_glyphs_has_no_paper_numbers(glyph_report):
    out, results = glyph_report
    assert not results["has_paper"]
    assert all(entry["paper"] is None for entry in results["entries"])
    assert "Compared with the paper" not in (out / "report.md").read_text()


def test_checkpoint_only_teacher(glyph_report, runs):
    out, results = glyph_report
    teacher = results["entries"][0]
    assert teacher["train_seconds"] is None and teacher["status"] is None and teacher["epochs_evaluated"] == 0
    assert teacher["last"] is None and teacher["best"]["recall@1"] == pytest.approx(0.61)
    assert teacher["here"]["recall@1"] >= 0 and teacher["evaluated_checkpoint"] == str(runs["downloaded"])
    assert "†" in format_summary(results)
    text = (out / "report.md").read_text()
    assert "teacher mode **clean**" in text and "different method" in text
    for name in PNGS:
        assert (out / name).is_file()


def test_format_summary_lists_every_entry(cub_report):
    out, results = cub_report
    summary = format_summary(results)
    assert "teacher" in summary and "relaxed_contrastive" in summary
    assert "45.0" in summary and "50.0 @2" in summary  # teacher: last R@1, best R@1 at epoch 2
    # The model column names the architecture, the header mentions † only when a row carries it, and the
    # table fits a terminal.
    header = summary.splitlines()[2].split()
    assert header[:3] == ["run", "model", "mode"] and "resnet18-8" in summary
    assert "†" not in summary and "†" not in (out / "report.md").read_text()
    assert max(len(line) for line in summary.splitlines()) <= 120, summary


def test_entry_without_checkpoint_is_a_one_line_error(tmp_path, splits):
    (tmp_path / "empty").mkdir()
    entries = [ReportEntry("ghost", "student", tmp_path / "empty")]
    with pytest.raises(CheckpointError, match="ghost"):
        write_report(tmp_path / "out", "compress", "cub", splits, entries, EVAL, CPU, progress=False)


def test_duplicate_entry_names_are_rejected(tmp_path, runs, splits):
    entries = [ReportEntry("x", "teacher", runs["teacher"]), ReportEntry("x", "student", runs["student"])]
    with pytest.raises(ConfigError, match="unique"):
        write_report(tmp_path, "compress", "cub", splits, entries, EVAL, CPU, progress=False)


def test_grid_rows_exclude_the_query_and_rank_by_distance():
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [12.0], [13.0]])
    embedded = ModelEmbeddings(points, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    config = EvalConfig(metric="euclidean", seed=3)
    rows = grid_rows(embedded, config, num_queries=4, num_neighbours=3)
    assert [row.query for row in rows] == [row.query for row in grid_rows(embedded, config, 4, 3)]
    assert len({row.query for row in rows}) == 4
    for row in rows:
        assert row.query not in row.neighbours and len(row.neighbours) == 3
        distances = [abs(float(points[n, 0]) - float(points[row.query, 0])) for n in row.neighbours]
        assert distances == sorted(distances) and distances[0] == 1.0
        assert row.neighbour_labels == [int(embedded.query_labels[n]) for n in row.neighbours]


def test_grid_rows_query_gallery_keeps_every_gallery_item():
    query = torch.tensor([[0.0], [5.0]])
    gallery = torch.tensor([[0.0], [5.0], [6.0]])
    embedded = ModelEmbeddings(query, torch.tensor([0, 1]), gallery, torch.tensor([0, 1, 1]))
    rows = grid_rows(embedded, EvalConfig(metric="euclidean"), num_queries=2, num_neighbours=2)
    by_query = {row.query: row.neighbours for row in rows}
    assert by_query == {0: [0, 1], 1: [1, 2]}


def test_run_and_checkpoint_folders(runs):
    teacher = runs["teacher"]
    assert checkpoint_folders(teacher) == {
        "last": teacher / "last",
        "best": teacher / "best",
        "checkpoint": None,
    }
    assert checkpoint_folders(runs["downloaded"])["checkpoint"] == runs["downloaded"]
    assert run_folder(teacher) == teacher
    assert run_folder(teacher / "best") == teacher  # a checkpoint inside a run still finds run.json
    assert run_folder(runs["downloaded"]) is None


def test_query_gallery_splits(runs, splits, tmp_path):
    positions = range(len(splits.test))
    query_gallery = DatasetSplits(
        name="glyphs-qg",
        train=splits.train,
        test=splits.test,
        query=Subset(splits.test, [i for i in positions if i % 2 == 0]),
        gallery=Subset(splits.test, [i for i in positions if i % 2 == 1]),
        recall_ks=(1, 10),
        defaults=splits.defaults,
    )
    entries = [ReportEntry("student", "student", runs["student"])]
    results = write_report(tmp_path, "compress", "inshop", query_gallery, entries, EVAL, CPU, progress=False)
    student = results["entries"][0]
    assert results["ks"] == [1, 10] and student["paper"] is None
    assert set(student["here"]) == {"recall@1", "recall@10", "map@r", "nmi"}
    assert max(results["curve_ks"]) == 32 and len(student["recall_curve"]) == 32
    with Image.open(tmp_path / "retrieval_grid.png") as image:
        assert image.size[0] > 300


def test_read_history_skips_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "recall@1": 0.5}\nnot json\n\n{"epoch": 2, "recall@1": 0.6}\n')
    assert [row["epoch"] for row in read_history(path)] == [1, 2]
    assert read_history(tmp_path / "absent.jsonl") == []


def test_paper_tables_shape_and_typos():
    assert paper.canonical_scenario("Self_Transfer") == "self-transfer"
    assert paper.canonical_scenario("compression") == "compress"
    assert paper.canonical_scenario("mine") is None
    sop = paper.paper_result("dim_reduction", "sop", "fitnet")
    assert sop.ks == (1, 10, 100) and sop.recall == (76.6, 89.3, 95.4)
    assert paper.paper_result("self-transfer", "cars", None, role="teacher").recall == (86.4, 91.9, 95.0)
    assert paper.paper_result("self-transfer", "inshop", "rkd") is None
    assert paper.paper_result("self-transfer", "cub", "relaxed_ms") is None
    suspects = [
        (s, d, m)
        for s, table in paper.TRANSFER_RESULTS.items()
        for d, rows in table.items()
        for m, cell in rows.items()
        if cell.suspect
    ]
    assert sorted(suspects) == [("compress", "cub", "source"), ("compress", "sop", "source")]
    for table in paper.TRANSFER_RESULTS.values():
        assert set(table) == {"cub", "cars", "sop"}
        for dataset, rows in table.items():
            assert len(rows) == 8 and all(cell.ks == paper.DATASET_KS[dataset] for cell in rows.values())
    assert paper.SOURCE_RESULTS["resnet50"]["cub"].recall[2] == 86.6


def _brute_force_top_k(model_dir: Path, splits: DatasetSplits, queries: list[int], k: int) -> list[list[int]]:
    """The oracle: embed the test split, rank every other test image by cosine similarity (ties: lower index)."""
    from dmlkd.checkpoints import load_checkpoint
    from dmlkd.evaluation.run import embed_collection, eval_image_size, eval_resize_ratio

    model, _ = load_checkpoint(model_dir)
    size, ratio = eval_image_size(EVAL, splits), eval_resize_ratio(EVAL, splits)
    embeddings, _ = embed_collection(model, splits.test, EVAL, size, ratio, CPU, progress=False)
    unit = embeddings.double() / embeddings.double().norm(dim=1, keepdim=True)
    found = []
    for query in queries:
        similarity = (unit @ unit[query]).tolist()
        others = [i for i in range(len(similarity)) if i != query]
        found.append(sorted(others, key=lambda i: (-similarity[i], i))[:k])
    return found


def test_retrieval_grid_shows_teacher_and_student_for_the_same_queries_with_class_names(glyph_report, runs, splits):
    out, results = glyph_report
    grid = json.loads((out / "results.json").read_text())["retrieval_grid"]
    assert grid == json.loads(json.dumps(results["retrieval_grid"]))
    assert grid["models"] == ["teacher", "rkd"]  # the teacher first, then the student
    queries = [row["query"] for row in grid["queries"]]
    assert len(queries) == 6 and len(set(queries)) == 6
    # A glyph class is its character: the codepoint in each image's identifier (glyphs:U+0041:face:k).
    characters = {
        int(label): chr(int(identifier.split(":")[1][2:], 16))
        for identifier, label in zip(splits.test.identifiers, splits.test.labels.tolist())
    }
    markdown = (out / "report.md").read_text()
    for model, folder in (("teacher", runs["downloaded"]), ("rkd", runs["student"] / "last")):
        oracle = _brute_force_top_k(folder, splits, queries, grid["neighbours"])
        for row, expected in zip(grid["queries"], oracle):
            assert row["class"] == characters[row["label"]] == splits.test.class_name(splits.test.labels[row["query"]])
            (shown,) = [m for m in row["models"] if m["name"] == model]
            assert [n["index"] for n in shown["neighbours"]] == expected, (model, row["query"])
            for n in shown["neighbours"]:
                assert n["class"] == characters[int(splits.test.labels[n["index"]])]
                assert n["correct"] == (n["label"] == row["label"])
            cells = " | ".join(f"{'✓' if n['correct'] else '✗'} {n['class']}" for n in shown["neighbours"])
            who = "teacher" if model == "teacher" else "rkd (student)"
            assert f"| {row['query']} | {row['class']} | {who} | {cells} |" in markdown
    assert "Retrieval examples: the same test queries ranked by teacher, rkd" in markdown
    with Image.open(out / "retrieval_grid.png") as image:  # 6 queries x 2 models = 12 rows of thumbnails
        assert image.size[1] > 12 * 150


def test_datasets_name_their_classes(tmp_path):
    glyphs = build_splits(DataConfig(name="glyphs", options={"max_classes": 8}))[0]
    names = [glyphs.test.class_name(label) for label in sorted(set(glyphs.test.labels.tolist()))]
    assert all(len(name) == 1 for name in names) and len(set(names)) == len(names)
    assert names[0] == chr(int(glyphs.test.identifiers[0].split(":")[1][2:], 16))
    assert Subset(glyphs.test, [0]).class_name(int(glyphs.test.labels[0])) == names[0]
    for shade, name in enumerate(("ant", "bee", "cat", "dog")):
        (tmp_path / "tree" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40 * shade, 0, 0)).save(tmp_path / "tree" / name / "a.png")
    folder = build_splits(DataConfig(name="folder", root=str(tmp_path / "tree")))[0]
    assert [folder.train.class_name(label) for label in (0, 1)] == ["ant", "bee"]
    assert [folder.test.class_name(label) for label in (2, 3)] == ["cat", "dog"]
    from dmlkd.data.base import ImageCollection

    assert ImageCollection(["x"], [7]).class_name(7) == "7"  # no names: the number


def test_report_headline_is_last_and_best_on_test_is_a_marked_secondary_column(cub_report, runs):
    out, results = cub_report
    markdown, summary = (out / "report.md").read_text(), format_summary(results)
    assert "## Results: last/ (final step)" in markdown
    assert "## Best epoch: best/ (selected on the test split), optimistic" in markdown
    assert "checkpoint: last/ (final step)" in summary and "best/ (selected on the test split)" in summary
    assert "best/ R@1" in summary.splitlines()[2] and "best/ R@1 @epoch: best/ (selected on the test" in summary
    teacher = results["entries"][0]
    assert Path(teacher["evaluated_checkpoint"]) == runs["teacher"] / "last"
    assert teacher["evaluated_note"] == "last/ (final step)"


def test_retrieval_grid_png_frames_each_image_in_the_colour_its_label_calls_for(tmp_path: Path) -> None:
    """Pixels of the written PNG: every image scaled to the thumbnail size inside a frame that is blue for the
    query, green for a neighbour of the query's class and red otherwise (solid images, one colour per index)."""
    from dmlkd.pipelines import grid_image as plots

    def solid(index: int) -> Image.Image:  # 32 x 24 (not square): scaled up to 160 x 120
        return Image.new("RGB", (32, 24), (10 * index, 200 - 10 * index, 77))

    rows = [plots.GridRow(1, 0, [2, 3, 4], [0, 5, 0]), plots.GridRow(5, 7, [6, 1], [8, 7])]
    path = plots.plot_retrieval_grid(rows, solid, solid, tmp_path / "grid.png", title="teacher")
    with Image.open(path) as image:
        picture = np.asarray(image.convert("RGB"))
    assert picture.shape[:2] == (plots.TITLE_BAND + 2 * plots.CELL_HEIGHT, 4 * plots.CELL_WIDTH)
    rgb = {name: Image.new("RGB", (1, 1), color).getpixel((0, 0)) for name, color in
           (("query", plots.QUERY_COLOR), ("right", plots.CORRECT_COLOR), ("wrong", plots.WRONG_COLOR))}  # fmt: skip
    expected = [[(1, "query"), (2, "right"), (3, "wrong"), (4, "right")], [(5, "query"), (6, "wrong"), (1, "right")]]
    for r, line in enumerate(expected):
        for c, (index, frame) in enumerate(line):
            x, y = plots._cell_origin(r, c, plots.TITLE_BAND)
            left = x + plots.GAP // 2 + plots.FRAME  # a 160 x 120 picture: centred vertically, 20 px each side
            upper = y + plots.CAPTION_BAND + plots.FRAME + 20
            inside = picture[upper : upper + 120, left : left + 160]
            assert (inside == solid(index).getpixel((0, 0))).all(), (r, c)
            assert tuple(picture[upper - 2, left + 80]) == rgb[frame] == tuple(picture[upper + 121, left + 80])
            assert tuple(picture[upper + 60, left - 2]) == rgb[frame] == tuple(picture[upper + 60, left + 161])
            assert tuple(picture[upper - plots.FRAME - 1, left + 5]) != rgb[frame]  # the frame is 4 px wide
    blank = plots._cell_origin(1, 3, plots.TITLE_BAND)  # the second row has one neighbour fewer: white
    assert (picture[blank[1] : blank[1] + plots.CELL_HEIGHT, blank[0] :] == 255).all()
