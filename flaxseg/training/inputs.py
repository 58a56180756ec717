"""The input pipeline of a run: the configured dataset's TFDS source, augmented by grain."""

import jax

from flaxseg import data as data_lib
from flaxseg.constants import IMAGENET_MEAN, IMAGENET_STD
from flaxseg.data import pipeline


def _data_kwargs(config) -> dict:
    return {"data_dir": config.data_dir or None, "manual_dir": config.manual_dir or None}


def create_train_iterator(config):
    """This host's share of the shuffled, augmented training batches (checkpointable)."""
    source = data_lib.get_data_source(config.dataset, "train", **_data_kwargs(config))
    return pipeline.create_train_iterator(
        source,
        batch_size=config.batch_size // jax.process_count(),
        crop_size=config.crop_size,
        seed=config.seed,
        min_scale=config.min_scale,
        max_scale=config.max_scale,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_label=config.ignore_label,
        worker_count=config.worker_count,
    )


def create_eval_iterator(config, split: str = "validation"):
    """Whole images of ``split``, padded to a few bucket sizes (the padding carries the ignore
    label)."""
    source = data_lib.get_data_source(config.dataset, split, **_data_kwargs(config))
    return pipeline.create_eval_iterator(
        source,
        batch_size=config.eval_batch_size // jax.process_count(),
        bucket_multiple=config.eval_bucket_multiple,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_label=config.ignore_label,
    )
