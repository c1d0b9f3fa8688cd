"""Scenarios end to end on tiny settings, stage skipping and resume, the teacher check, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import dmlkd
from dmlkd.cli import main
from dmlkd.errors import ConfigError, Interrupted


def tiny(tmp: Path) -> list[str]:
    """A 16-class glyph subset (8 train classes), 2 optimiser steps per stage, a 2-view cache in ``tmp``."""
    return [
        "--set",
        "data.options.max_classes=16",
        "--max-steps",
        "2",
        "--teacher-epochs",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--set",
        "teacher.train.ipc=4",
        "--set",
        "transfer.train.ipc=2",
        "--set",
        "teacher.eval.nmi=false",
        "--set",
        "transfer.eval.nmi=false",
        "--set",
        "teacher.train.eval_at_start=false",
        "--set",
        "transfer.teacher.cache_views=2",
        "--set",
        f"transfer.teacher.cache_dir={json.dumps(str(tmp / 'cache'))}",
        "--no-progress",
    ]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def compress_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("compress")
    code, out, err = invoke(
        "pipeline",
        "compress",
        "--src",
        "resnet50-16",
        "--dst",
        "resnet18-8",
        "--out",
        str(tmp / "run"),
        *tiny(tmp),
    )
    assert code == 0, err
    assert "report:" in out and "relaxed_contrastive" in out
    return tmp / "run"


def test_compress_end_to_end(compress_run: Path) -> None:
    steps = json.loads((compress_run / "pipeline.json").read_text())["steps"]
    assert set(steps) == {
        "teacher",
        "teacher_check",
        "student:relaxed_contrastive",
        "export:relaxed_contrastive",
        "report",
    }
    results = json.loads((compress_run / "results.json").read_text())
    text = json.dumps(results)
    assert "relaxed_contrastive" in text
    for name in ("recall_per_epoch.png", "recall_at_k.png", "retrieval_grid.png"):
        with Image.open(compress_run / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    report = (compress_run / "report.md").read_text()
    assert "teacher" in report and "recall_at_k.png" in report
    teacher = dmlkd.load(str(compress_run / "teacher"))
    student = dmlkd.load(str(compress_run / "exports" / "relaxed_contrastive"))
    assert teacher.embedding_dim == 16 and student.embedding_dim == 8
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_same_command_skips_finished_steps(compress_run: Path, tmp_path: Path) -> None:
    weights = compress_run / "teacher" / "last" / "model.safetensors"
    student = compress_run / "students" / "relaxed_contrastive" / "last" / "model.safetensors"
    before = (weights.stat().st_mtime_ns, student.stat().st_mtime_ns)
    cache = compress_run.parent  # tiny() used the fixture's tmp folder for the cache
    code, _, err = invoke(
        "pipeline",
        "compress",
        "--src",
        "resnet50-16",
        "--dst",
        "resnet18-8",
        "--out",
        str(compress_run),
        *tiny(cache),
    )
    assert code == 0, err
    assert (weights.stat().st_mtime_ns, student.stat().st_mtime_ns) == before


def test_different_command_is_refused(compress_run: Path) -> None:
    before = (compress_run / "pipeline.json").read_text()
    code, _, err = invoke(
        "pipeline",
        "compress",
        "--src",
        "resnet50-16",
        "--dst",
        "resnet18-4",
        "--out",
        str(compress_run),
        *tiny(compress_run.parent),
    )
    assert code == 2 and "holds a pipeline run with different options" in err and "dst" in err
    assert len(err.strip().splitlines()) == 1
    assert (compress_run / "pipeline.json").read_text() == before


def test_resume_after_interruption_between_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmlkd.pipelines import runner

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise Interrupted(15, 0, "students")

    args = [
        "pipeline",
        "compress",
        "--src",
        "resnet18-16",
        "--dst",
        "resnet18-8",
        "--out",
        str(tmp_path / "run"),
        *tiny(tmp_path),
    ]
    with monkeypatch.context() as patch:
        patch.setattr(runner, "train_students", interrupted)
        code, _, err = invoke(*args)
    assert code == 128 + 15 and "stopped at step" in err
    steps = json.loads((tmp_path / "run" / "pipeline.json").read_text())["steps"]
    assert set(steps) == {"teacher", "teacher_check"}
    teacher_weights = tmp_path / "run" / "teacher" / "last" / "model.safetensors"
    mtime = teacher_weights.stat().st_mtime_ns
    code, _, err = invoke(*args)
    assert code == 0, err
    assert teacher_weights.stat().st_mtime_ns == mtime  # the teacher was not trained again
    assert "report" in json.loads((tmp_path / "run" / "pipeline.json").read_text())["steps"]


def test_self_transfer_and_dim_reduction_from_a_teacher_folder(compress_run: Path, tmp_path: Path) -> None:
    code, _, err = invoke(
        "pipeline",
        "self-transfer",
        "--src",
        "bn_inception-16",
        "--dst",
        "bn_inception-16",
        "--out",
        str(tmp_path / "self"),
        *tiny(tmp_path),
    )
    assert code == 0, err
    teacher = tmp_path / "self" / "teacher"
    code, _, err = invoke(
        "pipeline",
        "dim-reduction",
        "--src",
        str(teacher),
        "--dst",
        "bn_inception-8",
        "--out",
        str(tmp_path / "dim"),
        *tiny(tmp_path),
    )
    assert code == 0, err
    assert not (tmp_path / "dim" / "teacher").exists()  # SRC was a folder: nothing trained
    student = dmlkd.load(str(tmp_path / "dim" / "students" / "relaxed_contrastive"))
    assert student.embedding_dim == 8 and student.config.arch == "bn_inception"


def test_teacher_check_stops_on_a_teacher_that_does_not_reproduce(compress_run: Path, tmp_path: Path) -> None:
    import shutil

    fake = tmp_path / "teacher"
    shutil.copytree(compress_run / "teacher" / "last", fake)
    record = json.loads((fake / "config.json").read_text())
    record["metrics"]["recall@1"] = 0.99  # what a user sees when the weights silently did not load
    (fake / "config.json").write_text(json.dumps(record))
    code, _, err = invoke(
        "pipeline",
        "compress",
        "--src",
        str(fake),
        "--dst",
        "resnet18-8",
        "--out",
        str(tmp_path / "run"),
        *tiny(tmp_path),
    )
    assert code == 2, err
    assert err.startswith("error: ") and "far below the 99.0 recorded" in err
    assert not (tmp_path / "run" / "students").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "relaxed_contrastive,rkdd"], "unknown transfer method 'rkdd'"),
        (["--dst", "resnet18-"], "malformed model spec 'resnet18-'"),
        (["--src", "vgg16-512"], "unknown architecture 'vgg16'"),
        (["--set", "optim.lr=1"], "pipeline overrides start with teacher., transfer. or data."),
        (["--set", "teacher.optim.lrr=1"], "unknown config key optim.lrr"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--methods", "rkd,rkd"], "lists a method twice"),
    ],
)
def test_bad_pipeline_input(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = invoke("pipeline", "compress", "--out", str(tmp_path / "run"), "--no-progress", *args)
    assert code == 2, err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_literal_compress_command_carries_the_demo_resnet50_recipe() -> None:
    """`dmlkd pipeline compress --src resnet50-512 --dst resnet18-128` on the demo trains its ResNet-50 teacher
    with the recipe measured to learn the glyphs (teacher/config.py DEMO_GLYPHS_BY_ARCH); the default teacher
    (ResNet-34) and explicit flags are unaffected."""
    import yaml

    from dmlkd.config import merge
    from dmlkd.teacher.config import DEMO_GLYPHS_BY_ARCH, RECIPES

    code, out, err = invoke("pipeline", "compress", "--src", "resnet50-512", "--dst", "resnet18-128", "--print-config")
    assert code == 0, err
    teacher = yaml.safe_load(out)["teacher"]
    expected = merge(RECIPES["demo-glyphs"], DEMO_GLYPHS_BY_ARCH["resnet50"])
    assert teacher["model"]["arch"] == "resnet50" and teacher["model"]["zero_init_residual"] is True
    for section in ("optim", "train"):
        for key, value in expected[section].items():
            assert teacher[section][key] == value, (section, key)
    code, out, err = invoke("pipeline", "compress", "--print-config")
    assert code == 0, err
    default = yaml.safe_load(out)["teacher"]
    assert default["model"]["arch"] == "resnet34" and default["model"]["zero_init_residual"] is False
    assert default["train"]["epochs"] == RECIPES["demo-glyphs"]["train"]["epochs"]
    code, out, err = invoke("pipeline", "compress", "--src", "resnet50-512", "--teacher-epochs", "3", "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["teacher"]["train"]["epochs"] == 3


def test_a_pipeline_folder_of_an_older_version_is_the_same_run(tmp_path: Path) -> None:
    """A config field added since the folder was written (its default then) does not make the rerun differ."""
    from dmlkd.config import to_dict
    from dmlkd.pipelines.config import build_pipeline_config
    from dmlkd.pipelines.state import STATE_FILE, PipelineState, finished_results

    config, _ = build_pipeline_config(
        "compress", src=None, dst=None, methods=None, data={}, teacher_items=[], transfer_items=[]
    )
    out = tmp_path / "pipeline"
    state = PipelineState.open(out, config, overwrite=False)
    state.lock.release()
    record = json.loads((out / STATE_FILE).read_text())
    del record["config"]["teacher"]["model"]["zero_init_residual"]  # as written before the field existed
    record["steps"]["report"] = {"finished": True}
    (out / STATE_FILE).write_text(json.dumps(record))
    (out / "results.json").write_text(json.dumps({"summary": "kept"}))
    assert finished_results(out, config) == {"summary": "kept"}
    again = PipelineState.open(out, config, overwrite=False)  # not refused as "different options"
    again.lock.release()
    assert again.record["config"] == to_dict(config)
    changed, _ = build_pipeline_config(
        "compress", src=None, dst=None, methods=None, data={}, teacher_items=["train.epochs=1"], transfer_items=[]
    )
    with pytest.raises(ConfigError, match="different options"):
        PipelineState.open(out, changed, overwrite=False)


def test_a_format_2_pipeline_record_is_read_with_todays_names(tmp_path: Path) -> None:
    """pipeline.json format 2 called the steps "stages" and the teacher and student "src" and "dst": a
    folder written then is the same run today, and a --config file with the old keys still works."""
    from dmlkd.config import to_dict
    from dmlkd.pipelines.config import build_pipeline_config
    from dmlkd.pipelines.state import STATE_FILE, PipelineState, finished_results

    config, _ = build_pipeline_config(
        "compress", src=None, dst=None, methods=None, data={}, teacher_items=[], transfer_items=[]
    )
    old_config = to_dict(config)
    old_config["src"] = old_config.pop("teacher_source")
    old_config["dst"] = old_config.pop("student_spec")
    out = tmp_path / "pipeline"
    out.mkdir()
    record = {"format": 2, "config": old_config, "stages": {"teacher": {"status": "done"}, "report": {}}}
    (out / STATE_FILE).write_text(json.dumps(record))
    (out / "results.json").write_text(json.dumps({"summary": "kept"}))
    assert finished_results(out, config) == {"summary": "kept"}
    again = PipelineState.open(out, config, overwrite=False)
    again.lock.release()
    assert again.done("teacher") == {"status": "done"}
    again.save()
    assert json.loads((out / STATE_FILE).read_text())["format"] == 3
    from_file, _ = build_pipeline_config(
        "compress",
        src=None,
        dst=None,
        methods=None,
        data={},
        teacher_items=[],
        transfer_items=[],
        file_tree={"src": "resnet18-64", "dst": "resnet18-32"},
    )
    assert (from_file.teacher_source, from_file.student_spec) == ("resnet18-64", "resnet18-32")


def test_students_see_views_at_the_size_the_teacher_trains_at() -> None:
    """A teacher the pipeline trains at 64 px (BN-Inception on the 32 px demo) is not run on 32 px views: the
    students train at its size (and evaluate at their training size) unless the file, a flag or --set says
    otherwise; where the sizes agree (the public datasets' 224) nothing is added to the saved config."""
    from dmlkd.pipelines.config import build_pipeline_config

    def sizes(src: str, transfer_items: tuple[str, ...] = (), file_tree: dict | None = None, **data: str) -> tuple:
        config, _ = build_pipeline_config(
            "compress",
            src=src,
            dst="resnet18-128",
            methods=None,
            data=data,
            teacher_items=[],
            transfer_items=list(transfer_items),
            file_tree=file_tree,
        )
        return config.teacher.train.image_size, config.transfer.train.image_size, config.transfer.eval.image_size

    assert sizes("bn_inception-512") == (64, 64, None)
    assert sizes("bn_inception-512", ("train.image_size=96",)) == (64, 96, None)  # the command line still wins
    assert sizes("bn_inception-512", file_tree={"transfer": {"train": {"image_size": 80}}}) == (64, 80, None)
    assert sizes("resnet34-512") == (None, None, None)  # the demo teacher trains at the data's own size
    assert sizes("resnet50-512", name="cub")[1:] == (224, None)  # the students' recipe size, not a new field
