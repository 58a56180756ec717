"""The synthetic VOC-layout dataset and the `synthetic` builder config."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from flaxseg import data
from flaxseg.constants import IGNORE_LABEL, VOC_NUM_CLASSES
from flaxseg.data.colormap import voc_colormap
from flaxseg.data.synthetic import write_synthetic_voc

SMALL = dict(num_train=12, num_val=4, min_size=40, max_size=71)


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    return write_synthetic_voc(tmp_path_factory.mktemp("synthetic"), seed=7, **SMALL)


def _files(voc_root):
    return {
        str(p.relative_to(voc_root)): p.read_bytes()
        for p in sorted(voc_root.rglob("*"))
        if p.is_file()
    }


def _masks(voc_root):
    return {
        p.stem: np.asarray(Image.open(p))
        for p in sorted((voc_root / "SegmentationClass").glob("*.png"))
    }


def test_layout_and_split_lists(small_voc):
    list_dir = small_voc / "ImageSets" / "Segmentation"
    train = list_dir.joinpath("train.txt").read_text().split()
    val = list_dir.joinpath("val.txt").read_text().split()
    assert len(train) == 12 and len(val) == 4 and not set(train) & set(val)
    assert list_dir.joinpath("trainval.txt").read_text().split() == train + val
    for image_id in train + val:
        assert (small_voc / "JPEGImages" / f"{image_id}.jpg").is_file()
        assert (small_voc / "SegmentationClass" / f"{image_id}.png").is_file()


def test_same_seed_same_bytes_other_seed_other_bytes(small_voc, tmp_path):
    again = write_synthetic_voc(tmp_path / "again", seed=7, **SMALL)
    assert _files(again) == _files(small_voc)
    other = write_synthetic_voc(tmp_path / "other", seed=8, **SMALL)
    assert _files(other).keys() == _files(small_voc).keys()
    assert _files(other) != _files(small_voc)


def test_masks_are_voc_palette_pngs_and_sizes_vary(small_voc):
    sizes = set()
    for path in (small_voc / "SegmentationClass").glob("*.png"):
        with Image.open(path) as mask:
            assert mask.mode == "P"
            palette = np.asarray(mask.getpalette(), dtype=np.uint8).reshape(-1, 3)
            np.testing.assert_array_equal(palette[:256], voc_colormap())
            with Image.open(small_voc / "JPEGImages" / f"{path.stem}.jpg") as image:
                assert image.mode == "RGB" and image.size == mask.size
            sizes.update(mask.size)
    assert min(sizes) >= 40 and max(sizes) <= 71
    assert len(sizes) > 5 and any(side % 2 for side in sizes)  # varied, odd sizes included


def test_every_class_appears_with_a_void_band_on_boundaries(small_voc):
    masks = _masks(small_voc)
    seen = set()
    for mask in masks.values():
        seen.update(np.unique(mask).tolist())
        # Two different real labels never touch: a void band always separates them.
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            touching = (a != b) & (a != IGNORE_LABEL) & (b != IGNORE_LABEL)
            assert not touching.any()
        if (mask != 0).any():
            void = mask == IGNORE_LABEL
            assert 0 < void.mean() < 0.35  # a band, not regions
    assert seen == set(range(VOC_NUM_CLASSES)) | {IGNORE_LABEL}


def test_band_is_about_two_pixels_wide(small_voc):
    # A straight boundary crossed by a row shows a run of 2 void pixels; take the median
    # run length over all masks so that corners and touching bands do not count.
    runs = []
    for mask in _masks(small_voc).values():
        for row in mask == IGNORE_LABEL:
            padded = np.concatenate([[0], row.astype(np.int8), [0]])
            edges = np.flatnonzero(np.diff(padded))
            runs.extend(edges[1::2] - edges[::2])
    assert np.median(runs) in (2, 3)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        write_synthetic_voc(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="min_size=100, max_size=50"):
        write_synthetic_voc(tmp_path, min_size=100, max_size=50)


def test_default_synthetic_builder_through_get_data_source(tmp_path):
    train = data.get_data_source("synthetic", "train", data_dir=str(tmp_path))
    val = data.get_data_source("synthetic", "val", data_dir=str(tmp_path))
    assert len(train) == 500 and len(val) == 100
    for example in (train[0], val[len(val) - 1]):
        image, mask = example["image"], example["segmentation_mask"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        assert mask.dtype == np.uint8 and mask.shape == (*image.shape[:2], 1)
        assert 96 <= image.shape[0] <= 160 and 96 <= image.shape[1] <= 160
        assert set(np.unique(mask)) <= set(range(VOC_NUM_CLASSES)) | {IGNORE_LABEL}


def test_custom_synthetic_config_matches_the_written_pngs(tmp_path):
    builder = tfds.builder(
        "voc_segmentation",
        data_dir=str(tmp_path / "tfds"),
        config=data.synthetic_config("small", seed=7, **SMALL),
    )
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split="train")
    written = _masks(write_synthetic_voc(tmp_path / "reference", seed=7, **SMALL))
    assert len(source) == 12
    for index in range(len(source)):
        example = source[index]
        name = example["file_name"]
        name = (name.decode() if isinstance(name, bytes) else name).removesuffix(".jpg")
        np.testing.assert_array_equal(example["segmentation_mask"][..., 0], written[name])
