"""The data side of the bad-input catalogue (README "Troubleshooting"): each damaged input
ends a real TFDS build in one sentence naming the file or value, or, for images that are
merely not RGB, is converted with a warning naming the file.

Every failing build must leave the manual directory byte-for-byte unchanged and no dataset
version folder that TFDS would later take for a prepared dataset.
"""

import hashlib
import io
import logging
import zipfile
from pathlib import Path

import cityscapes_files as cityscapes_data
import numpy as np
import pytest
import scipy.io
from PIL import Image
from voc_files import VOC_TRAIN, _mask, _palette_png_bytes, write_sbd, write_voc

from flaxseg import data
from flaxseg.data.colormap import voc_colormap

IMAGE_ID = "2008_000002"  # in VOC train; its image is 17x31 (HxW)


def _fingerprint(folder: Path):
    """Every path under `folder` with its size, mtime and (for files) content hash."""
    return sorted(
        (
            str(path),
            path.stat().st_size,
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None,
        )
        for path in folder.rglob("*")
    )


def _voc_manual_dir(tmp_path, with_sbd=False):
    """A manual_dir with small VOC (and SBD) trees in folder form; returns it and the roots."""
    manual = tmp_path / "manual"
    voc_root = write_voc(manual)
    sbd_root = write_sbd(manual) if with_sbd else None
    return manual, voc_root, sbd_root


def _build(tmp_path, manual, dataset, split="train"):
    return data.get_data_source(
        dataset, split, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)
    )


def _build_fails(tmp_path, manual, dataset, error_type) -> str:
    """Builds `dataset`, expecting `error_type`; checks that nothing was left behind and
    returns the message."""
    before = _fingerprint(manual)
    with pytest.raises(error_type) as error:
        _build(tmp_path, manual, dataset)
    assert _fingerprint(manual) == before, "the manual directory was modified"
    builder = data.get_builder(dataset, data_dir=str(tmp_path / "tfds"))
    assert not builder.is_prepared()
    assert not Path(builder.data_dir).exists()
    assert not [path for path in (tmp_path / "tfds").rglob("*") if "incomplete" in path.name]
    message = str(error.value)
    assert "\n" not in message
    return message


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# 1. Corrupt or truncated images and masks.


def test_truncated_jpeg_is_named_and_a_later_build_starts_clean(tmp_path):
    manual, voc_root, _ = _voc_manual_dir(tmp_path)
    path = voc_root / "JPEGImages" / f"{IMAGE_ID}.jpg"
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    message = _build_fails(tmp_path, manual, "voc2012", ValueError)
    assert message.startswith(f"Image file {path} is not a readable JPEG (")

    path.write_bytes(original)  # repaired: the next build must not trip over the failed one
    assert len(_build(tmp_path, manual, "voc2012")) == len(VOC_TRAIN)


def test_truncated_png_mask_is_named(tmp_path):
    manual, voc_root, _ = _voc_manual_dir(tmp_path)
    path = voc_root / "SegmentationClass" / f"{IMAGE_ID}.png"
    path.write_bytes(path.read_bytes()[:-40])  # the end of the pixel data and IEND cut off
    message = _build_fails(tmp_path, manual, "voc2012", ValueError)
    assert message.startswith(f"Mask file {path} is not a readable PNG (")


# ---------------------------------------------------------------------------------------
# 2. Images that are not RGB: converted, with a note naming the file and its mode.


def _image_in_mode(mode: str, shape) -> tuple[bytes, np.ndarray]:
    """An image of `shape` (H, W) in PIL `mode`, as a file's bytes (JPEG where JPEG can hold
    the mode, else PNG: such files do turn up under .jpg names), and its RGB pixels."""
    # Smooth colour ramps: JPEG re-encoding (with chroma subsampling) keeps them close.
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]]
    ramps = np.stack([rows * 10, columns * 6, 255 - columns * 4 - rows * 3], axis=-1)
    rgb = Image.fromarray(np.clip(ramps, 0, 255).astype(np.uint8))
    rng = np.random.default_rng(0)
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
        image = Image.merge("RGBA", (*rgb.split(), alpha))
    elif mode == "P":
        image = rgb.quantize(colors=16, dither=Image.Dither.NONE)
    else:
        image = rgb.convert(mode)
    assert image.mode == mode
    if mode in ("L", "CMYK"):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        contents = buffer.getvalue()
    else:
        contents = _png_bytes(image)
    with Image.open(io.BytesIO(contents)) as reopened:
        return contents, np.asarray(reopened.convert("RGB"))


def _example_named(source, file_name: str) -> dict:
    """The one example of `source` whose file_name is `file_name`."""
    names = [source[i]["file_name"] for i in range(len(source))]
    names = [name.decode() if isinstance(name, bytes) else name for name in names]
    assert names.count(file_name) == 1, names
    return source[names.index(file_name)]


def _warnings_naming(caplog, path) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and str(path) in record.getMessage()
    ]


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_non_rgb_voc_image_is_converted_with_a_note(tmp_path, caplog, mode):
    manual, voc_root, _ = _voc_manual_dir(tmp_path)
    path = voc_root / "JPEGImages" / f"{IMAGE_ID}.jpg"
    contents, expected_rgb = _image_in_mode(mode, VOC_TRAIN[IMAGE_ID])
    path.write_bytes(contents)
    before = _fingerprint(manual)
    with caplog.at_level(logging.WARNING):
        source = _build(tmp_path, manual, "voc2012")
    assert _fingerprint(manual) == before

    example = _example_named(source, f"{IMAGE_ID}.jpg")
    assert example["image"].shape == (*VOC_TRAIN[IMAGE_ID], 3)
    # Stored re-encoded as JPEG (quality 95): close to PIL's own RGB conversion (palette
    # indices or CMYK read as colours would be off by tens of grey levels).
    difference = np.abs(example["image"].astype(int) - expected_rgb.astype(int))
    assert difference.mean() < 8
    np.testing.assert_array_equal(example["segmentation_mask"][..., 0], _mask(IMAGE_ID, (17, 31)))

    (note,) = _warnings_naming(caplog, path)
    assert note.startswith(f"Image file {path} is in PIL mode {mode!r}, not RGB; stored as RGB (")
    if mode == "RGBA":
        assert "alpha channel dropped" in note


def test_rgba_cityscapes_image_is_converted_losslessly_with_a_note(tmp_path, caplog):
    stem = "aachen_000001_000019"
    name = f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png"

    def add_alpha(files):
        rgb = cityscapes_data._image(stem)
        alpha = np.full(rgb.shape[:2] + (1,), 200, dtype=np.uint8)
        files["images"][name] = cityscapes_data._png(np.concatenate([rgb, alpha], axis=-1))

    manual = cityscapes_data.make_manual_dir(tmp_path, "folder", "folder", edit=add_alpha)
    before = _fingerprint(manual)
    with caplog.at_level(logging.WARNING):
        source = _build(tmp_path, manual, "cityscapes")
    assert _fingerprint(manual) == before
    example = _example_named(source, Path(name).name)
    np.testing.assert_array_equal(example["image"], cityscapes_data._image(stem))  # PNG: exact
    (note,) = _warnings_naming(caplog, manual / name)
    assert "PIL mode 'RGBA'" in note and "alpha channel dropped" in note


# ---------------------------------------------------------------------------------------
# 3.-5. Masks: values outside the classes, colour-rendered masks, wrong size.


def test_voc_mask_value_outside_labels_is_named(tmp_path):
    manual, voc_root, _ = _voc_manual_dir(tmp_path)
    path = voc_root / "SegmentationClass" / f"{IMAGE_ID}.png"
    mask = _mask(IMAGE_ID, VOC_TRAIN[IMAGE_ID])
    mask[4, 7] = 42
    path.write_bytes(_palette_png_bytes(mask))
    message = _build_fails(tmp_path, manual, "voc2012", ValueError)
    assert message == (
        f"Mask file {path} contains label value 42; valid values are 0..20 and 255 (void)."
    )


def test_sbd_mask_value_outside_labels_is_named(tmp_path):
    manual, _, sbd_root = _voc_manual_dir(tmp_path, with_sbd=True)
    path = sbd_root / "cls" / "2009_000007.mat"  # SBD-only id: read for train_aug
    scipy.io.savemat(path, {"GTcls": {"Segmentation": np.full((25, 16), 21, dtype=np.uint8)}})
    message = _build_fails(tmp_path, manual, "voc2012_aug", ValueError)
    assert message.startswith(f"Mask file {path} contains label value 21;")


def test_colour_rendered_rgb_mask_is_refused_with_a_hint(tmp_path):
    manual, voc_root, _ = _voc_manual_dir(tmp_path)
    path = voc_root / "SegmentationClass" / f"{IMAGE_ID}.png"
    colours = voc_colormap()[_mask(IMAGE_ID, VOC_TRAIN[IMAGE_ID])]
    path.write_bytes(_png_bytes(Image.fromarray(colours)))
    message = _build_fails(tmp_path, manual, "voc2012", ValueError)
    assert message.startswith(
        f"Mask file {path} is an RGB image, which looks like a colour-rendered mask; "
        "VOC masks must be palette ('P') or grayscale ('L') PNGs"
    )
    assert "VOC devkit" in message


def test_image_and_mask_size_mismatch_is_named(tmp_path):
    manual, voc_root, _ = _voc_manual_dir(tmp_path)
    path = voc_root / "SegmentationClass" / f"{IMAGE_ID}.png"
    path.write_bytes(_palette_png_bytes(_mask(IMAGE_ID, (17, 30))))
    message = _build_fails(tmp_path, manual, "voc2012", ValueError)
    image = voc_root / "JPEGImages" / f"{IMAGE_ID}.jpg"
    assert message == f"Mask file {path} is 30x17 (WxH) but its image {image} is 31x17."


# ---------------------------------------------------------------------------------------
# 6.-7. Split lists: empty, or an id twice.


@pytest.mark.parametrize(
    "dataset, list_file",
    [
        ("voc2012", "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
        ("voc2012", "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"),
        ("voc2012_aug", "benchmark_RELEASE/dataset/train.txt"),
    ],
)
def test_empty_split_list_is_named(tmp_path, dataset, list_file):
    manual, _, _ = _voc_manual_dir(tmp_path, with_sbd=dataset == "voc2012_aug")
    (manual / list_file).write_text("\n  \n")  # blank lines only
    message = _build_fails(tmp_path, manual, dataset, ValueError)
    assert (
        message == f"Split list {manual / list_file} holds no image ids; expected one id per line."
    )


def test_empty_train_aug_is_named(tmp_path):
    manual, voc_root, sbd_root = _voc_manual_dir(tmp_path, with_sbd=True)
    every_id = "2008_000001\n2008_000002\n2008_000003\n2008_000004\n2008_000005\n"
    every_id += "2009_000006\n2009_000007\n2009_000008\n"
    (voc_root / "ImageSets/Segmentation/val.txt").write_text(every_id)
    message = _build_fails(tmp_path, manual, "voc2012_aug", ValueError)
    assert message.startswith("train_aug is empty: every id of ")
    assert str(voc_root / "ImageSets/Segmentation/val.txt") in message


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_empty_cityscapes_split_folder_is_named(tmp_path, form):
    def drop_val_images(files):
        for name in [name for name in files["images"] if name.startswith("leftImg8bit/val/")]:
            del files["images"][name]
        # An empty city folder (folders are only implied by file names in a zip).
        files["images"]["leftImg8bit/val/frankfurt/README"] = b"nothing here\n"

    manual = cityscapes_data.make_manual_dir(tmp_path, form, "folder", edit=drop_val_images)
    message = _build_fails(tmp_path, manual, "cityscapes", FileNotFoundError)
    assert message.startswith("Image folder ")
    assert message.endswith(" holds no <city>/*_leftImg8bit.png files.")
    if form == "folder":
        assert str(manual / "leftImg8bit" / "val") in message
    else:
        assert "leftImg8bit_trainvaltest.zip" in message and "leftImg8bit/val" in message


@pytest.mark.parametrize(
    "dataset, list_file, ids",
    [
        (
            "voc2012",
            "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt",
            ["2008_000001", "2008_000003", "2008_000002", "2008_000003", "2008_000001"],
        ),
        (
            "voc2012_aug",
            "benchmark_RELEASE/dataset/val.txt",
            ["2008_000003", "2009_000008", "2009_000008"],
        ),
    ],
)
def test_id_listed_twice_in_one_split_list_is_named(tmp_path, dataset, list_file, ids):
    manual, _, _ = _voc_manual_dir(tmp_path, with_sbd=dataset == "voc2012_aug")
    (manual / list_file).write_text("\n".join(ids) + "\n")
    message = _build_fails(tmp_path, manual, dataset, ValueError)
    first_repeated = "2008_000003" if dataset == "voc2012" else "2009_000008"
    assert message == (
        f"Split list {manual / list_file} lists image id {first_repeated!r} more than once; "
        "each id must appear once."
    )


def test_id_in_several_sbd_and_voc_lists_is_not_a_duplicate(tmp_path):
    # train_aug is a union: 2008_000002 is in SBD train and VOC train, 2008_000003 in SBD
    # val and VOC train. Only an id repeated inside one file is an error.
    manual, _, _ = _voc_manual_dir(tmp_path, with_sbd=True)
    assert len(_build(tmp_path, manual, "voc2012_aug")) == 6


# ---------------------------------------------------------------------------------------
# 8. SBD .mat files without the expected field, or unreadable.


def _mat_v73_header() -> bytes:
    """The 128-byte header of a MATLAB v7.3 (HDF5) file, which scipy cannot read."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5"
    return text.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM"


@pytest.mark.parametrize(
    "contents, expected",
    [
        (
            {"GTcls": {"Boundaries": np.zeros((1,), np.uint8)}},
            "has no GTcls.Segmentation field (it holds GTcls.Boundaries); expected a "
            "cls/<id>.mat of SBD's benchmark_RELEASE.",
        ),
        (
            {"GTinst": {"Segmentation": np.zeros((25, 16), np.uint8)}},
            "has no GTcls.Segmentation field (it holds GTinst); expected",
        ),
        (b"not a mat file at all", "is not a readable .mat file ("),
        (_mat_v73_header(), "is not a readable .mat file (Please use HDF reader"),
    ],
    ids=["no-segmentation-field", "inst-instead-of-cls", "garbage", "matlab-v7.3"],
)
def test_sbd_mat_without_expected_field_is_named(tmp_path, contents, expected):
    manual, _, sbd_root = _voc_manual_dir(tmp_path, with_sbd=True)
    path = sbd_root / "cls" / "2009_000006.mat"
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    else:
        scipy.io.savemat(path, contents)
    message = _build_fails(tmp_path, manual, "voc2012_aug", ValueError)
    assert message.startswith(f"SBD label file {path} {expected}")


def test_zip_member_paths_in_messages_name_the_archive(tmp_path):
    # The same check as for folders, with the VOC-side reader fed a zip member: messages
    # name '<archive>/<member>' so the user can find the file.
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zip_file:
        zip_file.writestr("leftImg8bit/train/a/a_leftImg8bit.png", b"\x89PNG truncated")
    with zipfile.ZipFile(archive) as zip_file:
        member = zipfile.Path(zip_file, "leftImg8bit/train/a/a_leftImg8bit.png")
        with pytest.raises(ValueError) as error:
            data.voc.read_image(member, "png")
    assert f"{archive}/leftImg8bit/train/a/a_leftImg8bit.png is not a readable PNG" in str(
        error.value
    )
