"""Data layer: the TFDS builders (`voc_segmentation`, `cityscapes_segmentation`), the
dataset registry and the grain input pipeline.

Importing this package registers the builders with TFDS. Never imports flaxseg.models or
flaxseg.training.

    list_datasets()            # ['cityscapes', 'synthetic', 'voc2012', 'voc2012_aug']
    dataset_info('cityscapes')  # DatasetInfo(num_classes=19, class_names=..., colormap=...)
    source = get_data_source('voc2012_aug', 'train', data_dir=..., manual_dir=...)
    len(source); source[0]  # {'image': uint8 [H, W, 3], 'segmentation_mask': uint8 [H, W, 1],
                            #  'file_name': bytes, e.g. b'2007_000032.jpg'}
"""

from flaxseg.data import cityscapes, voc  # noqa: F401  (importing registers the builders)
from flaxseg.data.cityscapes import CityscapesSegmentation
from flaxseg.data.colormap import colorize, voc_colormap
from flaxseg.data.pipeline import (
    create_eval_iterator,
    create_train_iterator,
    eval_transform,
    image_sizes,
    normalise,
    to_uint8,
    train_transform,
)
from flaxseg.data.registry import (
    DATASETS,
    SPLITS,
    DatasetInfo,
    dataset_info,
    get_builder,
    get_data_source,
    list_datasets,
)
from flaxseg.data.synthetic import write_synthetic_voc
from flaxseg.data.voc import VocSegmentation, synthetic_config

__all__ = [
    "DATASETS",
    "SPLITS",
    "CityscapesSegmentation",
    "DatasetInfo",
    "VocSegmentation",
    "colorize",
    "create_eval_iterator",
    "create_train_iterator",
    "dataset_info",
    "eval_transform",
    "get_builder",
    "get_data_source",
    "image_sizes",
    "list_datasets",
    "normalise",
    "synthetic_config",
    "to_uint8",
    "train_transform",
    "voc_colormap",
    "write_synthetic_voc",
]
