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


def create_eval_iterator(config, split: str = "validation", with_sizes: bool = False):
    """Whole images of ``split``, padded to a few bucket sizes (the padding carries the ignore
    label); ``with_sizes`` adds each image's real size (`pipeline.create_eval_iterator`)."""
    source = data_lib.get_data_source(config.dataset, split, **_data_kwargs(config))
    return pipeline.create_eval_iterator(
        source,
        batch_size=config.eval_batch_size // jax.process_count(),
        bucket_multiple=config.eval_bucket_multiple,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_label=config.ignore_label,
        with_sizes=with_sizes,
    )


def iterator_state(iterator) -> dict:
    """What a checkpoint keeps of the training iterator: grain's state of this host's share and
    the process count it was taken with (a resume on another count converts it)."""
    return {"iterator": iterator.get_state(), "process_count": jax.process_count()}


def restore_iterator(iterator, saved: dict) -> None:
    """Moves a fresh training iterator to the position `saved` (`iterator_state`) records.

    Host k of n reads positions k, k + n, … of one global stream, so after t steps every host
    has read t·B/n examples (B the global batch); with n' processes now, each continues at
    t·B/n'. States saved before the process count was recorded are grain's state alone.
    """
    if "process_count" not in saved:  # an older checkpoint: grain's state, same process count
        iterator.set_state(saved)
        return
    state, count, now = saved["iterator"], saved["process_count"], jax.process_count()
    if count != now:
        if set(state) != {"next_index"}:
            raise ValueError(
                f"The checkpoint's input position was saved by {count} processes with grain "
                f"workers and cannot be moved to {now} processes; resume with {count} processes "
                "(or train with --config.worker_count=0)."
            )
        state = {"next_index": state["next_index"] * count // now}
    iterator.set_state(state)
