"""predict.py on a tiny trained workdir: palette PNGs hold the argmax of the model's logits on the
training normalisation, overlays keep the input's size, odd image modes are converted with a
note, unreadable files are named and skipped, TTA and CRF are wired through.

The workdir is the session's `trained_workdir` (tests/conftest.py, shared with test_export.py):
a tiny U-Net (BatchNorm, so batch_stats are restored too) trained for 2 steps on the synthetic
set.
"""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import reference_logits
from PIL import Image

from flaxseg import inference
from flaxseg.data import voc_colormap
from flaxseg.inference.crf import dense_crf
from flaxseg.serving import predict, restore

pytestmark = pytest.mark.slow  # trains a run (once per session) and runs predict.py

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    return trained_workdir


@pytest.fixture(scope="module")
def restored(workdir):
    return restore.restore_model(workdir, rgb=True)


def _random_image(rng, height, width, channels=3):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_palette_overlay_and_probs_match_the_model(workdir, restored, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_random_image(rng, 37, 53)).save(folder / "rgb.png")
    Image.fromarray(_random_image(rng, 37, 53, 4), "RGBA").save(folder / "rgba.png")
    Image.fromarray(_random_image(rng, 37, 53, 1), "L").save(folder / "gray.png")
    Image.fromarray(_random_image(rng, 37, 53)).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image extension: ignored")
    single = tmp_path / "single.png"
    Image.fromarray(_random_image(rng, 29, 41)).save(single)
    messages = []

    out = tmp_path / "out"
    summary = predict.predict_files(
        workdir, [folder, single], out, save_probs=True, log=messages.append
    )

    assert summary["step"] == 2
    assert [p.name for p, _ in summary["skipped"]] == ["broken.jpg"]
    assert any(
        m.startswith(f"Skipped {folder / 'broken.jpg'}: not a readable image") for m in messages
    )
    written = sorted(p.name for p, _ in summary["written"])
    assert written == ["cmyk.jpg", "gray.png", "rgb.png", "rgba.png", "single.png"]
    notes = "\n".join(summary["notes"])
    assert "rgba.png: converted from RGBA to RGB (transparency dropped)." in notes
    assert "gray.png: converted from L to RGB." in notes
    assert "cmyk.jpg: converted from CMYK to RGB." in notes
    assert "rgb.png" not in notes and "single.png" not in notes

    colormap = voc_colormap()
    for path, palette_path in summary["written"]:
        image = np.asarray(Image.open(path).convert("RGB"))
        with Image.open(palette_path) as palette:
            assert palette.mode == "P"
            stored_palette = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)
            indices = np.asarray(palette)
        np.testing.assert_array_equal(stored_palette[:21], colormap[:21])
        np.testing.assert_array_equal(indices, reference_logits(restored, image).argmax(-1))
        with Image.open(out / f"{path.stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (image.shape[1], image.shape[0])
        probs = np.load(out / f"{path.stem}_probs.npy")
        assert probs.dtype == np.float32 and probs.shape == (*image.shape[:2], 21)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(probs.argmax(-1), indices)
    assert not (out / "broken.png").exists()


def test_overlay_blends_and_lists_the_classes_present():
    image = np.full((60, 90, 3), 200, np.uint8)
    indices = np.zeros((60, 90), np.uint8)
    indices[:, 45:] = 15  # person
    colormap = voc_colormap()
    overlay = np.asarray(
        predict.overlay_image(image, indices, colormap, ["background"] + ["x"] * 20, 0.25)
    )
    # Far from the legend (top-left), each pixel is 0.75 * image + 0.25 * its class colour.
    np.testing.assert_array_equal(overlay[-1, 20], np.round(0.75 * 200 + 0.25 * colormap[0]))
    np.testing.assert_array_equal(overlay[-1, -1], np.round(0.75 * 200 + 0.25 * colormap[15]))
    # The legend's swatches: one row per class present, in the class colour.
    swatch = overlay[2 + 8 // 2, 2 + 8 // 2], overlay[2 + 10 + 8 // 2, 2 + 8 // 2]
    np.testing.assert_array_equal(swatch[0], colormap[0])
    np.testing.assert_array_equal(swatch[1], colormap[15])


def test_tta_and_crf_are_applied(workdir, restored, tmp_path):
    image = _random_image(np.random.default_rng(1), 29, 41)
    Image.fromarray(image).save(tmp_path / "x.png")

    def probs_of(**options):
        out = tmp_path / ("_".join(f"{k}{v}" for k, v in options.items()) or "plain")
        predict.predict_files(workdir, [tmp_path / "x.png"], out, save_probs=True, **options)
        probs = np.load(out / "x_probs.npy")
        np.testing.assert_array_equal(np.asarray(Image.open(out / "x.png")), probs.argmax(-1))
        return probs

    logits = reference_logits(restored, image)
    flipped = reference_logits(restored, image[:, ::-1])[:, ::-1]
    expected = (jax.nn.softmax(logits) + jax.nn.softmax(flipped)) / 2
    np.testing.assert_allclose(probs_of(flip=True), expected, atol=1e-5)
    plain = probs_of()
    np.testing.assert_allclose(plain, jax.nn.softmax(logits), atol=1e-6)
    np.testing.assert_allclose(probs_of(crf=True), dense_crf(image, plain), atol=1e-6)
    with pytest.raises(ValueError, match="Every scale must be a positive number"):
        predict.predict_files(workdir, [tmp_path / "x.png"], tmp_path, scales=(0.0,))
    assert inference.check_options((1.0,)) == (1.0,)


def test_bad_paths_are_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"^Folder .*empty holds no images \(files ending in"):
        predict.list_images([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match=r"^Image or folder .*missing.jpg does not exist"):
        predict.list_images([tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="Give at least one image or folder"):
        predict.list_images([])
    with pytest.raises(ValueError, match=r"^--out=.* would overwrite the input image .*x.png"):
        (tmp_path / "x.png").write_bytes(b"")
        predict.predict_files(tmp_path / "no_workdir", [tmp_path / "x.png"], tmp_path)
    first, second = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    assert predict.output_names([first, second, tmp_path / "x.jpg"]) == ["x", "x_1", "x_2"]


def _predict_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "predict.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def test_cli_skips_unreadable_and_refuses_empty_folder(workdir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_random_image(np.random.default_rng(2), 29, 41)).save(folder / "ok.png")
    (folder / "bad.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    result = _predict_cli(f"--workdir={workdir}", f"--out={out}", folder)
    assert result.returncode == 1, result.stderr
    assert f"Skipped {folder / 'bad.png'}: not a readable image" in result.stdout + result.stderr
    assert f"wrote 1 predictions to {out}, skipped 1 unreadable" in result.stdout
    assert (out / "ok.png").is_file() and (out / "ok_overlay.png").is_file()

    (tmp_path / "empty").mkdir()
    result = _predict_cli(f"--workdir={workdir}", f"--out={out}", tmp_path / "empty")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"predict.py: error: Folder {tmp_path / 'empty'} holds no images")
