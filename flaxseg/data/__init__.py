"""Data layer: the `voc_segmentation` TFDS builder and the grain input pipeline.

Importing this package registers the builder with TFDS. Never imports flaxseg.models or
flaxseg.training.

    source = get_data_source('voc2012_aug', 'train', data_dir=..., manual_dir=...)
    len(source); source[0]  # {'image': uint8 [H, W, 3], 'segmentation_mask': uint8 [H, W, 1],
                            #  'file_name': bytes, e.g. b'2007_000032.jpg'}
"""

import tensorflow_datasets as tfds

from flaxseg.data import voc  # noqa: F401  (registers `voc_segmentation` with TFDS)
from flaxseg.data.colormap import colorize, voc_colormap
from flaxseg.data.pipeline import (create_eval_iterator, create_train_iterator,
                                   eval_transform, image_sizes, train_transform)
from flaxseg.data.synthetic import write_synthetic_voc
from flaxseg.data.voc import VocSegmentation, synthetic_config

BUILDER_NAME = "voc_segmentation"

# Value of the --dataset flag → builder config name.
DATASETS = {"voc2012": "2012", "voc2012_aug": "2012_aug", "synthetic": "synthetic"}

# Accepted split names → TFDS split names.
SPLITS = {"train": "train", "validation": "validation", "val": "validation"}

__all__ = [
    "BUILDER_NAME", "DATASETS", "SPLITS", "VocSegmentation", "colorize", "create_eval_iterator",
    "create_train_iterator", "eval_transform", "get_builder", "get_data_source", "image_sizes",
    "synthetic_config", "train_transform", "voc_colormap", "write_synthetic_voc",
]


def get_builder(dataset: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The `voc_segmentation` builder for a --dataset value (see DATASETS)."""
    if dataset not in DATASETS:
        raise ValueError(
            f"Unknown dataset {dataset!r}; valid names are {', '.join(sorted(DATASETS))}.")
    return tfds.builder(f"{BUILDER_NAME}/{DATASETS[dataset]}", data_dir=data_dir)


def get_data_source(dataset: str, split: str, data_dir: str | None = None,
                    manual_dir: str | None = None):
    """A random-access source (len(), [i]) of numpy example dicts for `dataset` and `split`.

    Builds the dataset as array_record on first use (from `manual_dir` if given, else from
    TFDS's default manual directory `<data_dir>/downloads/manual`, else by downloading);
    later calls only open the prepared files.

    Args:
      dataset: one of DATASETS ('voc2012', 'voc2012_aug', 'synthetic').
      split: 'train', 'validation' or 'val'.
      data_dir: TFDS data directory (default: TFDS's, ~/tensorflow_datasets).
      manual_dir: folder holding the VOC/SBD archives or their extracted folders.
    """
    if split not in SPLITS:
        raise ValueError(
            f"Unknown split {split!r}; valid splits are {', '.join(sorted(SPLITS))}.")
    builder = get_builder(dataset, data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder.as_data_source(split=SPLITS[split])
