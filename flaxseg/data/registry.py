"""The dataset registry: one row per value of `--dataset`, naming its TFDS builder and config
and the facts that follow the dataset (classes, colours, ignore label).

Adding a dataset is one builder module (a TFDS builder whose features are
`voc.segmentation_features`) and one row in DATASETS.
"""

import contextlib
import dataclasses
import io
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from flaxseg.constants import IGNORE_LABEL, VOC_CLASSES
from flaxseg.data import cityscapes, voc
from flaxseg.data.colormap import voc_colormap


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a `--dataset` name stands for.

    Attributes:
      name: the `--dataset` value.
      builder, config: the TFDS builder and builder-config names (`tfds.builder(
        f'{builder}/{config}')`).
      num_classes: number of classes the labels hold (0..num_classes-1).
      class_names: one name per class index.
      colormap: a callable returning the colour of each label value, uint8 [256, 3]
        (`colorize(label_map, info.colormap)`).
      ignore_label: label value that is never trained on or scored.
      channels: the images' channel count (3: RGB); a model's in_channels must equal it.
      homepage, description: for humans.
    """

    name: str
    builder: str
    config: str
    num_classes: int
    class_names: tuple[str, ...]
    colormap: Callable[[], np.ndarray]
    ignore_label: int = IGNORE_LABEL
    channels: int = 3
    homepage: str = ""
    description: str = ""

    def __post_init__(self):
        assert self.num_classes == len(self.class_names), (self.name, self.class_names)


_VOC_HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "voc2012",
            voc.VocSegmentation.name,
            "2012",
            len(VOC_CLASSES),
            VOC_CLASSES,
            voc_colormap,
            homepage=_VOC_HOMEPAGE,
            description="PASCAL VOC 2012 segmentation: train 1464, validation 1449.",
        ),
        DatasetInfo(
            "voc2012_aug",
            voc.VocSegmentation.name,
            "2012_aug",
            len(VOC_CLASSES),
            VOC_CLASSES,
            voc_colormap,
            homepage=_VOC_HOMEPAGE,
            description="VOC 2012 with SBD: train_aug 10,582, validation = VOC val 1449.",
        ),
        DatasetInfo(
            "synthetic",
            voc.VocSegmentation.name,
            "synthetic",
            len(VOC_CLASSES),
            VOC_CLASSES,
            voc_colormap,
            description="Generated VOC-layout scenes, 21 VOC classes (no download).",
        ),
        DatasetInfo(
            "cityscapes",
            cityscapes.CityscapesSegmentation.name,
            "fine",
            cityscapes.NUM_CLASSES,
            cityscapes.CLASS_NAMES,
            cityscapes.colormap,
            homepage=cityscapes.HOMEPAGE,
            description="Cityscapes gtFine, 19 train ids: train 2975, validation 500.",
        ),
    )
}

# Accepted split names → TFDS split names.
SPLITS = {"train": "train", "validation": "validation", "val": "validation"}


def list_datasets() -> list[str]:
    """The valid `--dataset` names, sorted."""
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The registry row of `name`; ValueError naming the valid names if there is none."""
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r} (--dataset); valid names are {', '.join(list_datasets())}."
        )
    return DATASETS[name]


def get_builder(dataset: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a `--dataset` name (nothing is prepared or written)."""
    info = dataset_info(dataset)
    return tfds.builder(f"{info.builder}/{info.config}", data_dir=data_dir)


def get_data_source(
    dataset: str, split: str, data_dir: str | None = None, manual_dir: str | None = None
):
    """A random-access source (len(), [i]) of numpy example dicts for `dataset` and `split`.

    Builds the dataset as array_record on first use (from `manual_dir` if given, else from
    TFDS's default manual directory `<data_dir>/downloads/manual`, else, for VOC, by
    downloading); later calls only open the prepared files.

    Args:
      dataset: a `--dataset` name (`list_datasets()`).
      split: 'train', 'validation' or 'val'.
      data_dir: TFDS data directory (default: TFDS's, ~/tensorflow_datasets).
      manual_dir: folder holding the dataset's archives or their extracted folders.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits are {', '.join(sorted(SPLITS))}.")
    builder = get_builder(dataset, data_dir)
    if not builder.is_prepared():
        # TFDS narrates a preparation ("Downloading and preparing dataset Unknown size", shuffling
        # bars) that means nothing for the embedded synthetic set, built in seconds: hush it.
        quiet = dataset == "synthetic"
        with _silenced() if quiet else contextlib.nullcontext():
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
            )
    return builder.as_data_source(split=SPLITS[split])


@contextlib.contextmanager
def _silenced():
    """stdout and stderr swallowed (errors still raise, with their messages)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
