"""grain input pipelines: augmented training crops and whole-image, size-bucketed evaluation.

Both read a random-access source of VOC example dicts (`get_data_source`):
{'image': uint8 [H, W, 3], 'segmentation_mask': uint8 [H, W, 1] or [H, W], ...}, and yield
batches {'image': float32 [B, h, w, 3] normalised, 'label': int32 [B, h, w], 255 = ignore}
with static shapes, so a jitted step compiles once (training) or once per bucket (eval).

Multi-host: each host reads its own share (`shard_index`/`shard_count`, default
`jax.process_index()`/`jax.process_count()`) of one global, per-epoch shuffle, with
augmentations that depend on the example's global position only; `batch_size` is the
per-host batch size.
"""

import functools
import io
import math

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from flaxseg.constants import IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD


def normalise(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 RGB [..., 3] → float32 ((x / 255) − mean) / std: flaxseg's one normalisation, of
    the input pipeline (NumPy arrays) and of prediction and export (jax arrays, also traced:
    the exported function includes it)."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return (image.astype(np.float32) / 255.0 - mean) / std


def to_uint8(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """`normalise` undone: normalised float images → the uint8 RGB they came from (padding → the
    mean colour); jax arrays (also traced) or NumPy arrays."""
    pixels = (images * np.asarray(std) + np.asarray(mean)) * 255.0
    return pixels.round().clip(0, 255).astype(np.uint8)


def _as_label_map(mask: np.ndarray) -> np.ndarray:
    """[H, W, 1] or [H, W] → [H, W]."""
    mask = np.asarray(mask)
    return mask[..., 0] if mask.ndim == 3 else mask


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[:2] != mask.shape:
        raise ValueError(
            f"Expected an image [H, W, 3] and a mask [H, W] of the same size, got "
            f"{image.shape} and {mask.shape}."
        )


def _resize_pair(image: np.ndarray, mask: np.ndarray, scale: float):
    """Rescales the image bilinearly and the mask by nearest neighbour (labels stay labels)."""
    height, width = mask.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (W, H)
    image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return image, mask


def train_transform(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: int,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    ignore_label: int = IGNORE_LABEL,
):
    """Random scale, pad, random crop and random horizontal flip of one example.

    Args:
      image: uint8 [H, W, 3]. mask: uint8 [H, W] or [H, W, 1].
      rng: the only source of randomness, so equal generators give equal outputs.
    Returns:
      (float32 [crop_size, crop_size, 3] normalised, int32 [crop_size, crop_size]); pixels
      outside the scaled image (when it is smaller than the crop) are 0 in the image, i.e.
      the mean colour, and `ignore_label` in the label.
    """
    mask = _as_label_map(mask)
    _check_pair(image, mask)
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"Need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}.")
    image, mask = _resize_pair(image, mask, rng.uniform(min_scale, max_scale))
    height, width = mask.shape
    # Padding bottom/right up to the crop, then cropping, is cropping a window that may
    # reach past the image: only the part inside the image is copied.
    top = int(rng.integers(0, max(height, crop_size) - crop_size + 1))
    left = int(rng.integers(0, max(width, crop_size) - crop_size + 1))
    window_h, window_w = min(crop_size, height - top), min(crop_size, width - left)
    out_image = np.zeros((crop_size, crop_size, 3), dtype=np.float32)
    out_label = np.full((crop_size, crop_size), ignore_label, dtype=np.int32)
    out_image[:window_h, :window_w] = normalise(
        image[top : top + window_h, left : left + window_w], mean, std
    )
    out_label[:window_h, :window_w] = mask[top : top + window_h, left : left + window_w]
    if rng.random() < 0.5:
        out_image, out_label = out_image[:, ::-1], out_label[:, ::-1]
    return np.ascontiguousarray(out_image), np.ascontiguousarray(out_label)


def bucket_shape(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The padded (height, width): each side rounded up to a multiple of `multiple`."""
    return (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)


def eval_transform(
    image: np.ndarray,
    mask: np.ndarray,
    shape: tuple[int, int],
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    ignore_label: int = IGNORE_LABEL,
):
    """Normalises one whole example and pads it bottom/right to `shape` (image 0 = mean
    colour, label `ignore_label`); returns (float32 [Hb, Wb, 3], int32 [Hb, Wb])."""
    mask = _as_label_map(mask)
    _check_pair(image, mask)
    height, width = mask.shape
    if height > shape[0] or width > shape[1]:
        raise ValueError(f"Image of size {height}x{width} does not fit the bucket {shape}.")
    out_image = np.zeros((*shape, 3), dtype=np.float32)
    out_label = np.full(shape, ignore_label, dtype=np.int32)
    out_image[:height, :width] = normalise(image, mean, std)
    out_label[:height, :width] = mask
    return out_image, out_label


def _default_shard(shard_index, shard_count) -> tuple[int, int]:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"Need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}."
        )
    return shard_index, shard_count


def _train_example(example: dict, rng: np.random.Generator, **transform_kwargs) -> dict:
    image, label = train_transform(
        example["image"], example["segmentation_mask"], rng, **transform_kwargs
    )
    return {"image": image, "label": label}


def create_train_iterator(
    source,
    *,
    batch_size: int,
    crop_size: int,
    seed: int,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    ignore_label: int = IGNORE_LABEL,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 4,
):
    """An endless, deterministic iterator of augmented training batches.

    All of `source` is shuffled with `seed` (differently in every epoch), repeated forever and
    augmented by `train_transform` with a generator seeded from `seed` and the example's
    position in that global stream; this host takes every `shard_count`-th example of it from
    `shard_index` on (so with n hosts of batch_size b, the n batches of a step together are the
    batch of one host with batch_size n·b), batched with drop_remainder, so every batch is
    {'image': float32 [batch_size, crop_size, crop_size, 3],
     'label': int32 [batch_size, crop_size, crop_size]}.

    `iterator.get_state()` is a small JSON-serialisable dict (ints and strings; with
    worker_count > 0 it holds per-worker states in the same form), so it can go into an
    Orbax checkpoint (e.g. as JSON); `iterator.set_state(state)` on a freshly created iterator
    with the same arguments resumes at exactly the next batch.

    Args:
      worker_count: 0 reads in threads of this process; > 0 uses that many worker
        processes (grain `mp_prefetch`).
      num_threads: threads decoding and augmenting examples in each process.
    """
    if batch_size < 1 or crop_size < 1:
        raise ValueError(
            f"batch_size and crop_size must be positive, got {batch_size} and {crop_size}."
        )
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    if len(source) // shard_count < 1:
        raise ValueError(
            f"The source has {len(source)} examples, too few for {shard_count} shards."
        )
    # One global stream for all hosts: every host shuffles ALL examples with the same seed
    # (a new permutation each epoch) and augments each with a generator seeded from (seed + 1,
    # its position in the global stream); host k then takes positions k, k + n, k + 2n, ...
    # So the hosts' batches are disjoint, their augmentations independent, and the global
    # batch of an n-host run is exactly the batch of a 1-host run with the same seed.
    # A resumed iterator replays the same examples and augmentations.
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    dataset = dataset.random_map(
        functools.partial(
            _train_example,
            crop_size=crop_size,
            min_scale=min_scale,
            max_scale=max_scale,
            mean=mean,
            std=std,
            ignore_label=ignore_label,
        ),
        seed=seed + 1,
    )
    dataset = dataset[shard_index::shard_count]
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=max(2 * batch_size, num_threads)
        )
    )
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app (library use,
        # tests) nothing parses them, so their defaults are declared final here.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(dataset)


def image_sizes(source) -> list[tuple[int, int]]:
    """(height, width) of every example of `source`, in order.

    For a TFDS data source this reads only the JPEG headers of the stored records (no pixel
    decoding: VOC val takes well under a second); any other source is read in full once.
    """
    dataset_info = getattr(source, "dataset_info", None)
    split = getattr(source, "split", None)
    if dataset_info is not None and split is not None:
        raw = tfds.builder_from_directory(dataset_info.data_dir).as_data_source(
            split=split,
            decoders={
                "image": tfds.decode.SkipDecoding(),
                "segmentation_mask": tfds.decode.SkipDecoding(),
            },
        )
        sizes = []
        for index in range(len(raw)):
            with Image.open(io.BytesIO(raw[index]["image"])) as image:  # header only
                sizes.append((image.height, image.width))
        return sizes
    return [tuple(np.asarray(source[i]["image"]).shape[:2]) for i in range(len(source))]


def eval_batch_plan(
    sizes, *, batch_size: int, bucket_multiple: int, shard_index: int, shard_count: int
) -> list[tuple[tuple[int, int], list]]:
    """This host's eval batches as (bucket shape, [source index or None for a dummy]).

    The plan is made from every host's examples, so all hosts run the same number of
    batches with the same shapes in the same order (a multi-host jitted step needs that):
    each bucket's examples are cut into global batches of batch_size * shard_count, the
    last one filled with dummies, and this host takes its batch_size-long slice of each.
    """
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, (height, width) in enumerate(sizes):
        buckets.setdefault(bucket_shape(height, width, bucket_multiple), []).append(index)
    global_batch = batch_size * shard_count
    plan = []
    for shape in sorted(buckets):
        indices = buckets[shape]
        for start in range(0, len(indices), global_batch):
            chunk = indices[start : start + global_batch]
            chunk = chunk + [None] * (global_batch - len(chunk))
            plan.append((shape, chunk[shard_index * batch_size : (shard_index + 1) * batch_size]))
    return plan


def _eval_batch(planned, *, source, mean, std, ignore_label, with_sizes=False) -> dict:
    """Loads and pads one planned batch; dummies are all-ignore and weigh nothing. With
    ``with_sizes`` also 'size': int32 [B, 2], each image's real (height, width) inside its
    bucket (a dummy's is the bucket's)."""
    shape, indices = planned
    images = np.zeros((len(indices), *shape, 3), dtype=np.float32)
    labels = np.full((len(indices), *shape), ignore_label, dtype=np.int32)
    sizes = np.full((len(indices), 2), shape, dtype=np.int32)
    for row, index in enumerate(indices):
        if index is not None:
            example = source[index]
            sizes[row] = np.shape(example["image"])[:2]
            images[row], labels[row] = eval_transform(
                example["image"],
                example["segmentation_mask"],
                shape,
                mean=mean,
                std=std,
                ignore_label=ignore_label,
            )
    batch = {"image": images, "label": labels}
    return {**batch, "size": sizes} if with_sizes else batch


def create_eval_iterator(
    source,
    *,
    batch_size: int,
    bucket_multiple: int = 128,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    ignore_label: int = IGNORE_LABEL,
    shard_index: int | None = None,
    shard_count: int | None = None,
    sizes=None,
    num_threads: int = 4,
    with_sizes: bool = False,
):
    """A finite iterator over whole images, padded and grouped into size buckets.

    Each image is padded bottom/right to (ceil(H/m)·m, ceil(W/m)·m), m = bucket_multiple
    (image 0 after normalisation, label ignore_label); batches hold one bucket each and
    exactly batch_size examples (the last batch of a bucket is filled with all-ignore dummy
    examples), so an eval step compiles once per bucket. Yields
    {'image': float32 [batch_size, Hb, Wb, 3], 'label': int32 [batch_size, Hb, Wb]}.
    Across all hosts every real example is seen exactly once. With ``with_sizes`` each batch
    also holds 'size': int32 [batch_size, 2], the images' real (height, width) inside the
    bucket (a dummy's is the bucket's), which scaling and flipping at test time act on.

    Args:
      sizes: optional (height, width) per example, as from `image_sizes(source)`; pass it
        when evaluating the same source repeatedly to skip re-reading the sizes.
    """
    if batch_size < 1 or bucket_multiple < 1:
        raise ValueError(
            f"batch_size and bucket_multiple must be positive, got {batch_size} "
            f"and {bucket_multiple}."
        )
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    sizes = image_sizes(source) if sizes is None else list(sizes)
    if len(sizes) != len(source):
        raise ValueError(f"Got {len(sizes)} image sizes for a source of {len(source)} examples.")
    plan = eval_batch_plan(
        sizes,
        batch_size=batch_size,
        bucket_multiple=bucket_multiple,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    dataset = grain.MapDataset.source(plan).map(
        functools.partial(
            _eval_batch,
            source=source,
            mean=mean,
            std=std,
            ignore_label=ignore_label,
            with_sizes=with_sizes,
        )
    )
    return iter(
        dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
        )
    )
