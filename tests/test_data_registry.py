"""The dataset registry: one walk over every row, the Cityscapes facts, and `colorize`."""

import dataclasses
import os

import numpy as np
import pytest

from flaxseg import data
from flaxseg.constants import VOC_CLASSES

# Official Cityscapes names and colours by train id (cityscapesScripts helpers/labels.py).
CITYSCAPES = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)


def test_names():
    assert data.list_datasets() == ["cityscapes", "synthetic", "voc2012", "voc2012_aug"]
    assert sorted(data.DATASETS) == data.list_datasets()  # what train.py checks --dataset in


@pytest.mark.parametrize("name", ["cityscapes", "synthetic", "voc2012", "voc2012_aug"])
def test_every_row_is_consistent_and_has_a_builder(tmp_path, name):
    info = data.dataset_info(name)
    assert info.name == name and info.ignore_label == 255
    assert info.num_classes == len(info.class_names) == len(set(info.class_names))
    colours = np.asarray(info.colormap())
    assert colours.dtype == np.uint8 and colours.shape == (256, 3)
    assert len({tuple(colour) for colour in colours[: info.num_classes]}) == info.num_classes

    builder = data.get_builder(name, data_dir=str(tmp_path))
    assert (builder.name, builder.builder_config.name) == (info.builder, info.config)
    assert not builder.is_prepared()
    assert set(builder.info.features) == {"image", "segmentation_mask", "file_name"}
    assert not os.listdir(tmp_path)  # nothing prepared or written


def test_voc_rows():
    for name in ("voc2012", "voc2012_aug", "synthetic"):
        info = data.dataset_info(name)
        assert (info.builder, info.num_classes, info.class_names) == (
            "voc_segmentation",
            21,
            VOC_CLASSES,
        )
        np.testing.assert_array_equal(info.colormap(), data.voc_colormap())
    assert [data.dataset_info(name).config for name in ("voc2012", "voc2012_aug", "synthetic")] == [
        "2012",
        "2012_aug",
        "synthetic",
    ]


def test_cityscapes_row_has_the_official_classes_and_colours():
    info = data.dataset_info("cityscapes")
    assert (info.builder, info.config) == ("cityscapes_segmentation", "fine")
    assert info.class_names == tuple(name for name, _ in CITYSCAPES)
    colours = info.colormap()
    np.testing.assert_array_equal(colours[:19], [colour for _, colour in CITYSCAPES])
    np.testing.assert_array_equal(colours[255], (0, 0, 0))


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError) as error:
        data.dataset_info("nope")
    message = str(error.value)
    assert "'nope'" in message and "--dataset" in message
    assert all(name in message for name in data.list_datasets())
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        data.get_builder("nope")


def test_rows_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.dataset_info("cityscapes").num_classes = 20


def test_colorize_with_each_colour_map():
    labels = np.array([[0, 18], [255, 13]])
    cityscapes = data.dataset_info("cityscapes").colormap
    expected = [[(128, 64, 128), (119, 11, 32)], [(0, 0, 0), (0, 0, 142)]]
    np.testing.assert_array_equal(data.colorize(labels, cityscapes), expected)  # a callable
    np.testing.assert_array_equal(data.colorize(labels, cityscapes()), expected)  # an array
    voc = data.colorize(np.array([[1, 255]]))  # default: the VOC palette
    np.testing.assert_array_equal(voc, [[(128, 0, 0), (224, 224, 192)]])
    with pytest.raises(ValueError, match=r"0\.\.18"):
        data.colorize(labels, cityscapes()[:19])
