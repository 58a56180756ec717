"""The `voc_segmentation` builder on small VOC and SBD archives that the tests write.

Every build is a real TFDS build (array_record) read back with `tfds.data_source`.
"""

import os
import time

import numpy as np
import pytest
import scipy.io
from PIL import Image
from voc_files import (
    SBD_TRAIN,
    SBD_VAL,
    VOC_TRAIN,
    VOC_VAL,
    _jpeg_bytes,
    _mask,
    _palette_png_bytes,
    _sbd_mask,
    make_manual_dir,
    write_voc,
)

from flaxseg import data
from flaxseg.data import voc


def _snapshot(folder):
    """Every path under `folder` with its size and mtime, to prove it was not modified."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _examples_by_id(source):
    examples = {}
    for index in range(len(source)):
        example = source[index]
        name = example["file_name"]
        name = name.decode() if isinstance(name, bytes) else name
        examples[name.removesuffix(".jpg")] = example
    return examples


def _decoded_jpeg(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_voc2012_from_archive_returns_exact_palette_indices(tmp_path):
    manual = make_manual_dir(tmp_path, "archive", with_sbd=False)
    before = _snapshot(manual)
    sources = {
        split: data.get_data_source(
            "voc2012", split, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)
        )
        for split in ("train", "val")
    }
    assert _snapshot(manual) == before  # manual_dir is only read
    assert len(sources["train"]) == 3 and len(sources["val"]) == 2

    extracted = tmp_path / "staging" / "VOCdevkit" / "VOC2012"
    for split, ids in (("train", VOC_TRAIN), ("val", VOC_VAL)):
        examples = _examples_by_id(sources[split])
        assert set(examples) == set(ids)
        for image_id, shape in ids.items():
            example = examples[image_id]
            assert example["image"].dtype == np.uint8 and example["image"].shape == (*shape, 3)
            assert example["segmentation_mask"].dtype == np.uint8
            assert example["segmentation_mask"].shape == (*shape, 1)
            np.testing.assert_array_equal(
                example["segmentation_mask"][..., 0], _mask(image_id, shape)
            )
            # The original JPEG bytes are stored, so decoding gives the same pixels.
            np.testing.assert_array_equal(
                example["image"], _decoded_jpeg(extracted / "JPEGImages" / f"{image_id}.jpg")
            )


@pytest.mark.parametrize("form", ["archive", "folder"])
def test_voc2012_aug_train_is_sbd_plus_voc_train_minus_voc_val(tmp_path, form):
    manual = make_manual_dir(tmp_path, form, with_sbd=True)
    before = _snapshot(manual)
    data_dir = str(tmp_path / "tfds")
    train = data.get_data_source("voc2012_aug", "train", data_dir=data_dir, manual_dir=str(manual))
    validation = data.get_data_source(
        "voc2012_aug", "validation", data_dir=data_dir, manual_dir=str(manual)
    )
    assert _snapshot(manual) == before

    expected_ids = (set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL)
    assert expected_ids == {
        "2008_000001",
        "2008_000002",
        "2008_000003",
        "2009_000006",
        "2009_000007",
        "2009_000008",
    }
    assert voc.train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL) == sorted(expected_ids)
    examples = _examples_by_id(train)
    assert len(train) == 6 and set(examples) == expected_ids
    for image_id in expected_ids:
        mask = examples[image_id]["segmentation_mask"][..., 0]
        if image_id in VOC_TRAIN:  # VOC's own mask wins over SBD's for VOC train ids
            np.testing.assert_array_equal(mask, _mask(image_id, VOC_TRAIN[image_id]))
        else:
            shape = {**SBD_TRAIN, **SBD_VAL}[image_id]
            np.testing.assert_array_equal(mask, _sbd_mask(image_id, shape))
            assert set(np.unique(mask)) == {0, 3, 9, 12, 20}
    # 2008_000002 and 2008_000003 are in SBD too, with different labels: VOC's were taken.
    assert not np.array_equal(_mask("2008_000002", (17, 31)), _sbd_mask("2008_000002", (17, 31)))

    assert set(_examples_by_id(validation)) == set(VOC_VAL)


def _voc_folder_with(tmp_path, edit):
    """A manual_dir with a small VOC tree in folder form, after `edit(voc_root)`."""
    manual = tmp_path / "manual"
    edit(write_voc(manual))
    return manual


def _build_2012(tmp_path, manual):
    return data.get_data_source(
        "voc2012", "train", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)
    )


def test_corrupt_jpeg_is_named(tmp_path):
    def truncate(voc_root):
        path = voc_root / "JPEGImages" / "2008_000002.jpg"
        path.write_bytes(path.read_bytes()[:200])

    manual = _voc_folder_with(tmp_path, truncate)
    with pytest.raises(ValueError, match=r"2008_000002\.jpg.*not a readable JPEG"):
        _build_2012(tmp_path, manual)


def test_corrupt_png_is_named(tmp_path):
    def garble(voc_root):
        (voc_root / "SegmentationClass" / "2008_000003.png").write_bytes(b"\x89PNG not really")

    manual = _voc_folder_with(tmp_path, garble)
    with pytest.raises(ValueError, match=r"2008_000003\.png.*not a readable PNG"):
        _build_2012(tmp_path, manual)


def test_mask_value_outside_voc_labels_is_named(tmp_path):
    def add_42(voc_root):
        mask = _mask("2008_000001", VOC_TRAIN["2008_000001"])
        mask[3, 5] = 42
        (voc_root / "SegmentationClass" / "2008_000001.png").write_bytes(_palette_png_bytes(mask))

    manual = _voc_folder_with(tmp_path, add_42)
    with pytest.raises(ValueError, match=r"2008_000001\.png contains label value 42"):
        _build_2012(tmp_path, manual)


def test_sbd_label_value_outside_voc_labels_is_named(tmp_path):
    image_path = tmp_path / "x.jpg"
    image_path.write_bytes(_jpeg_bytes((8, 8), 0))
    scipy.io.savemat(
        tmp_path / "x.mat", {"GTcls": {"Segmentation": np.full((8, 8), 21, dtype=np.uint8)}}
    )
    with pytest.raises(ValueError, match=r"x\.mat contains label value 21"):
        voc.make_example(image_path, tmp_path / "x.mat")


def test_image_and_mask_size_mismatch_is_named(tmp_path):
    def shrink_mask(voc_root):
        (voc_root / "SegmentationClass" / "2008_000002.png").write_bytes(
            _palette_png_bytes(_mask("2008_000002", (17, 30)))
        )

    manual = _voc_folder_with(tmp_path, shrink_mask)
    with pytest.raises(ValueError, match=r"2008_000002\.png is 30x17.*2008_000002\.jpg is 31x17"):
        _build_2012(tmp_path, manual)


def test_missing_split_list_is_named(tmp_path):
    manual = _voc_folder_with(
        tmp_path, lambda voc_root: (voc_root / "ImageSets/Segmentation/val.txt").unlink()
    )
    expected = manual / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    with pytest.raises(FileNotFoundError, match=f"Split list {expected} does not exist"):
        _build_2012(tmp_path, manual)


def test_offline_without_manual_files_fails_fast_naming_the_archive_paths(tmp_path, monkeypatch):
    # An address that never answers (TEST-NET-1, RFC 5737) stands for a machine whose
    # firewall drops packets: the connect timeout must end the wait, not a hang.
    monkeypatch.setattr(voc, "VOC_URL", "http://192.0.2.1/VOCtrainval_11-May-2012.tar")
    monkeypatch.setattr(voc, "CONNECT_TIMEOUT_S", 1.0)
    manual = tmp_path / "empty_manual"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        _build_2012(tmp_path, manual)
    assert time.monotonic() - start < 20
    message = str(error.value)
    assert str(manual / "VOCtrainval_11-May-2012.tar") in message
    assert str(manual / "VOCdevkit" / "VOC2012") in message
    assert "192.0.2.1" in message
    assert "--manual_dir" in message and "--dataset=synthetic" in message
    assert "\n" not in message  # one sentence
    # The default dataset (train_aug) names both archives it needs.
    with pytest.raises(FileNotFoundError, match=r"needs VOCtrainval_11-May-2012.tar and benchmark"):
        data.get_data_source(
            "voc2012_aug", "train", data_dir=str(tmp_path / "aug"), manual_dir=str(manual)
        )


def test_unknown_dataset_and_split_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown dataset 'voc2007'.*synthetic.*voc2012"):
        data.get_data_source("voc2007", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"Unknown split 'test'.*train.*val"):
        data.get_data_source("voc2012", "test", data_dir=str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing was built or downloaded
