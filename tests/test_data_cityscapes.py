"""The `cityscapes_segmentation` builder on small Cityscapes archives that the tests write.

The fake data has the release's layout and file names: `leftImg8bit/{train,val,test}/<city>/
<city>_<seq>_<frame>_leftImg8bit.png` and `gtFine/{train,val,test}/<city>/..._gtFine_*.png`
under the roots of leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, beside README and
license files. Every build is a real TFDS build read back with `tfds.data_source`.
"""

import zipfile

import numpy as np
import pytest
from cityscapes_files import (
    OFFICIAL_TRAIN_IDS,
    SHAPE,
    TRAIN,
    VAL,
    _image,
    _label_ids,
    _png,
    _train_ids,
    _write_zip,
    cityscapes_files,
    make_manual_dir,
)

from flaxseg import data
from flaxseg.data import cityscapes


def _snapshot(folder):
    """Every path under `folder` with its size and mtime, to prove it was not modified."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _build(tmp_path, manual, split="train"):
    return data.get_data_source(
        "cityscapes", split, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)
    )


def test_label_id_table_is_the_official_one():
    for label_id in range(256):
        expected = OFFICIAL_TRAIN_IDS.get(label_id, 255)
        assert cityscapes.LABEL_ID_TO_TRAIN_ID[label_id] == expected, label_id


@pytest.mark.parametrize("images,labels", [("zip", "zip"), ("folder", "folder"), ("zip", "folder")])
def test_build_gives_lossless_images_and_train_ids(tmp_path, images, labels):
    manual = make_manual_dir(tmp_path, images, labels)
    before = _snapshot(manual)
    sources = {split: _build(tmp_path, manual, split) for split in ("train", "validation")}
    assert _snapshot(manual) == before  # manual_dir is only read
    assert not list((tmp_path / "tfds").rglob("*.png"))  # the zips were not extracted

    for split, cities in (("train", TRAIN), ("validation", VAL)):
        source = sources[split]
        stems = [stem for city in sorted(cities) for stem in cities[city]]
        assert len(source) == len(stems)
        examples = {}
        for index in range(len(source)):
            example = source[index]
            name = example["file_name"]
            examples[name.decode() if isinstance(name, bytes) else name] = example
        assert set(examples) == {f"{stem}_leftImg8bit.png" for stem in stems}
        for stem in stems:
            example = examples[f"{stem}_leftImg8bit.png"]
            assert example["image"].dtype == np.uint8 and example["image"].shape == (*SHAPE, 3)
            np.testing.assert_array_equal(example["image"], _image(stem))  # lossless
            mask = example["segmentation_mask"]
            assert mask.dtype == np.uint8 and mask.shape == (*SHAPE, 1)
            np.testing.assert_array_equal(mask[..., 0], _train_ids(stem))
    all_masks = np.concatenate(
        [sources["train"][i]["segmentation_mask"].ravel() for i in range(len(sources["train"]))]
    )
    assert set(np.unique(all_masks)) == {0, 1, 2, 11, 13, 16, 18, 255}


def test_missing_archives_name_where_to_put_them(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        _build(tmp_path, manual)
    message = str(error.value)
    assert str(manual / "leftImg8bit_trainvaltest.zip") in message
    assert str(manual / "leftImg8bit") in message

    labels_missing = make_manual_dir(tmp_path / "images_only", "zip", None)
    with pytest.raises(FileNotFoundError) as error:
        _build(tmp_path / "images_only", labels_missing)
    message = str(error.value)
    assert str(labels_missing / "gtFine_trainvaltest.zip") in message
    assert str(labels_missing / "gtFine") in message


def test_label_id_outside_cityscapes_ids_is_named(tmp_path):
    def add_40(files):
        name = "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
        label_ids = _label_ids("bochum_000000_000313")
        label_ids[5, 7] = 40
        files["labels"][name] = _png(label_ids)

    manual = make_manual_dir(tmp_path, edit=add_40)
    with pytest.raises(
        ValueError,
        match=r"gtFine_trainvaltest\.zip/gtFine/train/bochum/"
        r"bochum_000000_000313_gtFine_labelIds\.png contains "
        r"label id 40",
    ):
        _build(tmp_path, manual)


def test_image_without_label_file_is_named(tmp_path):
    def drop_label(files):
        del files["labels"]["gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"]

    manual = make_manual_dir(tmp_path, "folder", "folder", edit=drop_label)
    expected = manual / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    with pytest.raises(
        FileNotFoundError,
        match=f"Label file {expected} for image .*lindau_000000_000019_leftImg8bit.png",
    ):
        _build(tmp_path, manual)


def test_image_and_label_size_mismatch_is_named(tmp_path):
    def shrink_label(files):
        stem = "aachen_000001_000019"
        files["labels"][f"gtFine/train/aachen/{stem}_gtFine_labelIds.png"] = _png(
            _label_ids(stem, (24, 39))
        )

    manual = make_manual_dir(tmp_path, "folder", "folder", edit=shrink_label)
    with pytest.raises(
        ValueError,
        match=r"aachen_000001_000019_gtFine_labelIds\.png is 39x24.*"
        r"aachen_000001_000019_leftImg8bit\.png is 40x24",
    ):
        _build(tmp_path, manual)


def test_unreadable_image_is_named(tmp_path):
    def truncate(files):
        name = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
        files["images"][name] = files["images"][name][:100]

    manual = make_manual_dir(tmp_path, edit=truncate)
    with pytest.raises(
        ValueError,
        match=r"aachen_000000_000019_leftImg8bit\.png is not a "
        r"readable PNG",
    ):
        _build(tmp_path, manual)


def test_corrupt_or_foreign_zip_is_named(tmp_path):
    manual = make_manual_dir(tmp_path)
    (manual / cityscapes.IMAGE_ARCHIVE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(
        ValueError, match=f"{manual / cityscapes.IMAGE_ARCHIVE} is not a readable zip file"
    ):
        _build(tmp_path, manual)

    # A member whose bytes were damaged after zipping: the CRC check names it.
    _write_zip(manual / cityscapes.IMAGE_ARCHIVE, cityscapes_files()["images"])
    member = "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    with zipfile.ZipFile(manual / cityscapes.IMAGE_ARCHIVE) as archive:
        info = archive.getinfo(member)
    contents = bytearray((manual / cityscapes.IMAGE_ARCHIVE).read_bytes())
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    contents[data_start + info.compress_size // 2] ^= 0xFF  # stored (not deflated) members
    (manual / cityscapes.IMAGE_ARCHIVE).write_bytes(bytes(contents))
    with pytest.raises(ValueError, match=f"Image file .*{member} could not be read .*CRC"):
        _build(tmp_path / "crc", manual, "validation")

    # A zip whose folders do not sit at its root (re-zipped by hand, say).
    _write_zip(manual / cityscapes.IMAGE_ARCHIVE, {"leftImg8bit_trainvaltest/README": b""})
    with pytest.raises(ValueError, match="has no leftImg8bit/ folder at its root"):
        _build(tmp_path, manual)
