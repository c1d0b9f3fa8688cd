"""``dmlkd search``: neighbours from an embeddings file or an image folder, model checks, grid and HTML pages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.evaluation.knn import knn
from dmlkd.inference.embed import read_embeddings
from dmlkd.models import create_model

SIZE = 32
TRAIN = {"train": {"image_size": SIZE}}
CLASSES = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def _main():
    from dmlkd.cli import main

    return main


def _invoke(*args: str):
    return CliRunner().invoke(_main(), [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint, its ONNX export, a second checkpoint and a 3-class folder of 12 images."""
    root = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "ckpt", create_model("resnet18-16").eval(), train_config=TRAIN)
    torch.manual_seed(1)
    other = save_checkpoint(root / "other", create_model("resnet18-16").eval(), train_config=TRAIN)
    rng = np.random.default_rng(0)
    for name, color in CLASSES.items():
        (root / "photos" / name).mkdir(parents=True)
        for number in range(4):
            pixels = np.clip(np.array(color) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "photos" / name / f"{name}{number}.png")
    onnx = root / "onnx"
    result = _invoke("export", checkpoint, "--format", "onnx", "--out", onnx)
    assert result.exit_code == 0, result.output
    gallery = root / "photos.safetensors"
    result = _invoke("embed", checkpoint, root / "photos", "--out", gallery, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return {"root": root, "checkpoint": checkpoint, "other": other, "onnx": onnx, "gallery": gallery}


def _search_json(*args: str) -> dict:
    result = _invoke("search", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_search_file_gallery_matches_brute_force_and_leaves_the_query_out(setup: dict) -> None:
    photos = setup["root"] / "photos"
    queries = [photos / "red" / "red0.png", photos / "blue" / "blue2.png"]
    result = _search_json(*queries, "--gallery", setup["gallery"], "-k", "3", "--labels-from-folders")
    embeddings, paths, meta = read_embeddings(setup["gallery"])
    assert meta["model_digest"] == result["model"]["model_digest"] and meta["image_size"] == SIZE
    for query, row in zip(queries, result["queries"]):
        own = paths.index(str(query))
        _scores, indices = knn(embeddings[own : own + 1], embeddings, 4)
        expected = [paths[i] for i in indices[0].tolist() if i != own][:3]
        assert row["path"] == str(query) and [n["path"] for n in row["neighbours"]] == expected
        assert str(query) not in [n["path"] for n in row["neighbours"]]
        got_scores = [n["score"] for n in row["neighbours"]]
        assert got_scores == sorted(got_scores, reverse=True)
        assert all(n["match"] == (n["label"] == row["label"]) for n in row["neighbours"])
    assert result["model"]["kind"] == "checkpoint" and result["backend"] == "torch" and result["gallery"]["size"] == 12
    with_self = _search_json(queries[0], "--gallery", setup["gallery"], "-k", "1", "--include-self")
    assert with_self["queries"][0]["neighbours"][0]["path"] == str(queries[0])
    assert with_self["queries"][0]["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_search_with_the_onnx_export_and_a_folder_gallery_agree(setup: dict) -> None:
    query = setup["root"] / "photos" / "green" / "green1.png"
    from_file = _search_json(query, "--gallery", setup["gallery"], "-k", "4")
    with_onnx = _search_json(query, "--gallery", setup["gallery"], "--model", setup["onnx"], "-k", "4")
    on_the_fly = _search_json(query, "--gallery", setup["root"] / "photos", "--model", setup["onnx"], "-k", "4")
    assert with_onnx["model"]["kind"] == on_the_fly["model"]["kind"] == "onnx"
    for other in (with_onnx, on_the_fly):
        assert [n["path"] for n in other["queries"][0]["neighbours"]] == [
            n["path"] for n in from_file["queries"][0]["neighbours"]
        ]
        for a, b in zip(other["queries"][0]["neighbours"], from_file["queries"][0]["neighbours"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    text = _invoke("search", query, "--gallery", setup["gallery"], "-k", "2")
    assert text.exit_code == 0 and text.stdout.count("\n") == 4 and "query " in text.stdout


def test_search_faiss_backend_gives_the_same_neighbours(setup: dict) -> None:
    pytest.importorskip("faiss")
    query = setup["root"] / "photos" / "blue"
    torch_result = _search_json(query, "--gallery", setup["gallery"], "-k", "3", "--metric", "euclidean")
    faiss_result = _search_json(
        query, "--gallery", setup["gallery"], "-k", "3", "--metric", "euclidean", "--backend", "faiss"
    )
    assert faiss_result["backend"] == "faiss"
    for a, b in zip(torch_result["queries"], faiss_result["queries"]):
        assert [n["path"] for n in a["neighbours"]] == [n["path"] for n in b["neighbours"]]


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_search_refuses_another_model_or_input_size(setup: dict, tmp_path: Path) -> None:
    query = setup["root"] / "photos" / "red" / "red1.png"
    _one_line_error(
        _invoke("search", query, "--gallery", setup["gallery"], "--model", setup["other"]), "did not embed", "digest"
    )
    bigger = tmp_path / "onnx48"
    assert (
        _invoke("export", setup["checkpoint"], "--format", "onnx", "--out", bigger, "--image-size", "48").exit_code == 0
    )
    _one_line_error(
        _invoke("search", query, "--gallery", setup["gallery"], "--model", bigger),
        "48x48",
        f"embedded at {SIZE}x{SIZE}",
    )
    _one_line_error(_invoke("search", query, "--gallery", setup["gallery"], "--image-size", "64"), "--image-size 64")
    _one_line_error(_invoke("search", query, "--gallery", setup["gallery"], "-k", "50"), "-k 50", "only 12")
    _one_line_error(_invoke("search", query, "--gallery", setup["root"] / "photos"), "needs --model")


def test_embed_skip_bad_images_lists_what_it_skipped(setup: dict, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(setup["root"] / "photos" / "red", folder)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "mixed.safetensors"
    _one_line_error(_invoke("embed", setup["checkpoint"], folder, "--out", out), "broken.png")
    assert not out.exists()
    result = _invoke("embed", setup["checkpoint"], folder, "--out", out, "--skip-bad-images")
    assert result.exit_code == 0, result.output
    assert f"skipped {folder / 'broken.png'}" in result.stderr and "1 unreadable images skipped" in result.stdout
    _embeddings, paths, meta = read_embeddings(out)
    assert len(paths) == 4 and meta["skipped"] == [str(folder / "broken.png")]


def test_search_grid_png_frames_matches_green_and_misses_red(setup: dict, tmp_path: Path) -> None:
    photos = setup["root"] / "photos"
    grid = tmp_path / "grid.png"
    result = _search_json(
        photos / "red", "--gallery", setup["gallery"], "-k", "11", "--labels-from-folders", "--grid", grid
    )
    pixels = np.asarray(Image.open(grid).convert("RGB"))
    cell_w = 96 + 8 + 6
    assert pixels.shape[1] == 12 * cell_w and pixels.shape[0] == 4 * (96 + 8 + 18)
    for row, query in enumerate(result["queries"]):
        for item in query["neighbours"]:
            corner = tuple(pixels[row * (96 + 8 + 18) + 1, item["rank"] * cell_w + 1])
            assert corner == ((46, 125, 50) if item["match"] else (198, 40, 40))
    # 11 neighbours of 12 images with the query left out: each red query sees its 3 red siblings and all 8 others.
    assert all(sum(n["match"] for n in q["neighbours"]) == 3 for q in result["queries"])


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for the HTML test: apt-get install -y chromium (.ci/run does this)")


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--virtual-time-budget=5000",
]

# Appended to a copy of the page: records what the browser decoded for each thumbnail into the DOM.
PROBE = """<script>
window.addEventListener('load', function () {
  var images = document.querySelectorAll('img.thumb');
  var decoded = 0;
  images.forEach(function (image) {
    image.setAttribute('data-natural', image.naturalWidth + 'x' + image.naturalHeight);
    if (image.complete && image.naturalWidth > 0) { decoded += 1; }
  });
  document.body.setAttribute('data-decoded', decoded + '/' + images.length);
});
</script>"""


def _browser(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_search_html_page_is_self_contained_and_renders_in_chromium(setup: dict, tmp_path: Path) -> None:
    photos = setup["root"] / "photos"
    page = tmp_path / "results.html"
    queries = [photos / "red" / "red0.png", photos / "green" / "green3.png", photos / "blue" / "blue1.png"]
    result = _search_json(*queries, "--gallery", setup["gallery"], "-k", "4", "--labels-from-folders", "--html", page)
    text = page.read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "http" not in text.replace("http-equiv", "")
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    dumped = _browser(probed, tmp_path / "profile-dom", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    assert 'data-decoded="15/15"' in dom, dom[:500]
    assert dom.count('data-natural="128x128"') == 15
    rows = re.findall(r'<tr class="result" data-query="([^"]+)">(.*?)</tr>', dom, flags=re.S)
    assert [path for path, _ in rows] == [str(q) for q in queries]
    for (_, cells), query in zip(rows, result["queries"]):
        ranks = re.findall(r'<td class="(match|miss)" data-path="([^"]+)" data-rank="(\d)"', cells)
        assert [(kind == "match", path, int(rank)) for kind, path, rank in ranks] == [
            (n["match"], n["path"], n["rank"]) for n in query["neighbours"]
        ]
    screenshot = tmp_path / "search-page.png"
    shot = _browser(page, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1100,700")
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    picture = np.asarray(Image.open(screenshot).convert("RGB"))
    assert (np.abs(picture.astype(int) - (46, 125, 50)).sum(axis=2) < 30).sum() > 200  # green frames are drawn
    # The test folder goes when the test passes; a copy outside it stays for people to look at.
    artefacts = Path(os.environ.get("DMLKD_TEST_ARTEFACTS", Path(tempfile.gettempdir()) / "dmlkd-test-artefacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    kept = artefacts / "search-page.png"
    shutil.copyfile(screenshot, kept)
    print(f"\nsearch page screenshot: {kept} (and {screenshot})")


def test_embeddings_file_made_with_a_relative_ref_is_searchable_from_elsewhere(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(setup["root"])
    made = tmp_path / "relative.safetensors"
    assert _invoke("embed", "ckpt", "photos/red", "--out", made, "--device", "cpu").exit_code == 0
    monkeypatch.chdir(tmp_path)
    result = _search_json(setup["root"] / "photos" / "red" / "red0.png", "--gallery", made, "-k", "2")
    assert result["model"]["checkpoint"] == str(setup["checkpoint"].resolve())
