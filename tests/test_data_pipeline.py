"""The grain input pipelines: augmentation, batching, exact resume and bucketed eval."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxseg import data
from flaxseg.constants import IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD
from flaxseg.data import pipeline


def _normalised(image):
    return (image.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def _example(index: int, height: int, width: int) -> dict:
    """An example whose label is index + 1 everywhere (so a crop tells where it came from)."""
    rng = np.random.default_rng(index)
    return {
        "image": rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8),
        "segmentation_mask": np.full((height, width, 1), index + 1, dtype=np.uint8),
    }


def _source(count: int = 8, size: int = 24) -> list:
    return [_example(i, size + i % 3, size + 2 * (i % 2)) for i in range(count)]


def _ids(batch) -> list[int]:
    """The example index behind each row of a batch built from `_source`."""
    ids = []
    for label in batch["label"]:
        values = set(np.unique(label).tolist()) - {IGNORE_LABEL}
        assert len(values) == 1
        ids.append(values.pop() - 1)
    return ids


# ----------------------------------------------------------------- train_transform


def test_small_image_is_padded_with_mean_colour_and_ignore_label():
    example = _example(3, 10, 13)
    image, label = pipeline.train_transform(
        example["image"],
        example["segmentation_mask"],
        np.random.default_rng(0),
        crop_size=32,
        min_scale=1.0,
        max_scale=1.0,
    )
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert label.shape == (32, 32) and label.dtype == np.int32
    padded = label == IGNORE_LABEL
    assert padded.sum() == 32 * 32 - 10 * 13
    assert np.all(image[padded] == 0.0)  # the mean colour normalises to exactly 0
    # The real pixels are the normalised original, at the top-left or (flipped) top-right.
    original = _normalised(example["image"])
    candidates = [image[:10, :13], image[:10, ::-1][:, :13]]
    assert any(np.allclose(c, original, atol=1e-6) for c in candidates)
    assert np.all(label[~padded] == 4)


def test_flip_happens_about_half_the_time_and_mirrors_image_and_label():
    example = _example(0, 16, 16)
    example["segmentation_mask"][:, :5] = 7  # an asymmetric label
    original = _normalised(example["image"])
    flips = 0
    for seed in range(40):
        image, label = pipeline.train_transform(
            example["image"],
            example["segmentation_mask"],
            np.random.default_rng(seed),
            crop_size=16,
            min_scale=1.0,
            max_scale=1.0,
        )
        flipped = bool(label[0, -1] == 7)
        expected_image = original[:, ::-1] if flipped else original
        expected_label = example["segmentation_mask"][..., 0][:, :: -1 if flipped else 1]
        np.testing.assert_allclose(image, expected_image, atol=1e-6)
        np.testing.assert_array_equal(label, expected_label)
        flips += flipped
    assert 10 <= flips <= 30


def test_scaling_resizes_labels_by_nearest_neighbour():
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8) % 21
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    _, label = pipeline.train_transform(
        image, mask, np.random.default_rng(1), crop_size=16, min_scale=2.0, max_scale=2.0
    )
    upscaled = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)
    assert np.array_equal(label, upscaled) or np.array_equal(label, upscaled[:, ::-1])
    # Half size: a 10x10 image in a 16 crop, the rest ignore; values stay real labels.
    big = np.tile(mask, (3, 3))[:20, :20]
    _, label = pipeline.train_transform(
        np.zeros((20, 20, 3), np.uint8),
        big,
        np.random.default_rng(2),
        crop_size=16,
        min_scale=0.5,
        max_scale=0.5,
    )
    assert (label != IGNORE_LABEL).sum() == 100
    assert set(np.unique(label).tolist()) <= set(np.unique(big).tolist()) | {IGNORE_LABEL}


def test_random_scales_stay_in_range():
    example = _example(1, 40, 40)
    real_pixels = []
    for seed in range(30):
        _, label = pipeline.train_transform(
            example["image"],
            example["segmentation_mask"],
            np.random.default_rng(seed),
            crop_size=100,
            min_scale=0.5,
            max_scale=2.0,
        )
        real_pixels.append(int((label != IGNORE_LABEL).sum()))
    # The scaled image (20..80 px a side) fits in the 100 crop: its area is all real pixels.
    assert min(real_pixels) >= 20 * 20 and max(real_pixels) <= 80 * 80
    assert max(real_pixels) > 2 * min(real_pixels)


# ----------------------------------------------------------------- train iterator


def _train_iterator(source, seed=0, **kwargs):
    kwargs = {"batch_size": 4, "crop_size": 16, "num_threads": 2, **kwargs}
    return data.create_train_iterator(source, seed=seed, **kwargs)


def test_train_batches_have_static_shapes_and_are_deterministic():
    source = _source()
    batches = [next(iterator) for iterator in [_train_iterator(source, seed=5)] * 3]
    for batch in batches:
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (4, 16, 16) and batch["label"].dtype == np.int32
    again = _train_iterator(source, seed=5)
    for batch in batches:
        other = next(again)
        np.testing.assert_array_equal(batch["image"], other["image"])
        np.testing.assert_array_equal(batch["label"], other["label"])
    different = next(_train_iterator(source, seed=6))
    assert not np.array_equal(batches[0]["image"], different["image"])


def test_every_epoch_is_a_new_permutation_of_the_shard():
    source = _source(count=8)
    iterator = _train_iterator(source, seed=1, batch_size=8)
    epochs = [_ids(next(iterator)) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(8))
    assert len({tuple(e) for e in epochs}) == 3
    # Two hosts split the examples between them.
    halves = [
        set(_ids(next(_train_iterator(source, seed=1, batch_size=4, shard_index=i, shard_count=2))))
        for i in range(2)
    ]
    assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == set(range(8))


def test_hosts_share_one_global_stream_with_independent_augmentations():
    # Issue 12: with n hosts, host k takes positions k, k + n, ... of ONE globally shuffled,
    # position-seeded stream, so a 2-host step's two batches are exactly a 1-host batch of
    # twice the size (same examples, same crops and flips), not two copies of host 0's draws.
    source = _source(count=8)
    single = _train_iterator(source, seed=4, batch_size=4)
    hosts = [
        _train_iterator(source, seed=4, batch_size=2, shard_index=i, shard_count=2)
        for i in range(2)
    ]
    for _ in range(5):  # past the first epoch (8 examples = 2 global batches)
        expected = next(single)
        parts = [next(host) for host in hosts]
        for key in ("image", "label"):
            interleaved = np.stack([parts[0][key], parts[1][key]], axis=1)
            np.testing.assert_array_equal(interleaved.reshape(expected[key].shape), expected[key])
        # Hosts draw different examples (and so different augmentations) in the same step.
        assert set(_ids(parts[0])).isdisjoint(_ids(parts[1]))
        assert not np.array_equal(parts[0]["image"], parts[1]["image"])


def test_state_is_json_and_resumes_exactly():
    source = _source()
    iterator = _train_iterator(source, seed=3)
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = [next(iterator) for _ in range(3)]
    resumed = _train_iterator(source, seed=3)
    resumed.set_state(state)
    for batch in expected:
        other = next(resumed)
        np.testing.assert_array_equal(batch["image"], other["image"])
        np.testing.assert_array_equal(batch["label"], other["label"])


def test_state_with_worker_processes_is_json_and_resumes_exactly():
    source = _source()
    iterator = _train_iterator(source, seed=4, worker_count=1)
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = next(iterator)
    iterator.close()
    resumed = _train_iterator(source, seed=4, worker_count=1)
    resumed.set_state(state)
    other = next(resumed)
    resumed.close()
    np.testing.assert_array_equal(expected["image"], other["image"])
    np.testing.assert_array_equal(expected["label"], other["label"])


# ----------------------------------------------------------------- eval iterator

EVAL_SIZES = [(10, 12), (30, 20), (33, 40), (5, 5), (64, 64), (31, 33), (32, 32)]


def _eval_source():
    return [_example(i, h, w) for i, (h, w) in enumerate(EVAL_SIZES)]


def test_eval_batches_are_bucketed_padded_and_see_every_image_once():
    source = _eval_source()
    batches = list(
        data.create_eval_iterator(source, batch_size=2, bucket_multiple=32, num_threads=2)
    )
    # Buckets: 32x32 holds 4 images (2 batches), 64x64 holds 2 (1 batch), 32x64 holds 1
    # (1 batch with a dummy).
    shapes = [batch["image"].shape[1:3] for batch in batches]
    assert sorted(shapes) == [(32, 32), (32, 32), (32, 64), (64, 64)]
    seen = []
    dummies = 0
    for batch in batches:
        assert batch["image"].shape[0] == 2 and batch["label"].shape[0] == 2
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        for image, label in zip(batch["image"], batch["label"]):
            real = label != IGNORE_LABEL
            if not real.any():
                dummies += 1
                assert np.all(image == 0.0)
                continue
            index = int(label[real][0]) - 1
            seen.append(index)
            height, width = EVAL_SIZES[index]
            assert real.sum() == height * width and real[:height, :width].all()
            np.testing.assert_allclose(
                image[:height, :width], _normalised(source[index]["image"]), atol=1e-6
            )
            assert np.all(image[~real] == 0.0)
    assert sorted(seen) == list(range(len(EVAL_SIZES))) and dummies == 1


def test_eval_shards_run_the_same_shapes_and_split_the_images():
    sizes = [(h, w) for h, w in EVAL_SIZES]
    plans = [
        pipeline.eval_batch_plan(
            sizes, batch_size=2, bucket_multiple=32, shard_index=i, shard_count=2
        )
        for i in range(2)
    ]
    assert [shape for shape, _ in plans[0]] == [shape for shape, _ in plans[1]]
    indices = [i for plan in plans for _, chunk in plan for i in chunk if i is not None]
    assert sorted(indices) == list(range(len(EVAL_SIZES)))
    assert all(len(chunk) == 2 for plan in plans for _, chunk in plan)


def test_image_sizes_reads_tfds_sources_without_decoding(tmp_path):
    builder = tfds.builder(
        "voc_segmentation",
        data_dir=str(tmp_path),
        config=data.synthetic_config("tiny", num_train=6, num_val=3, min_size=33, max_size=70),
    )
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split="validation")
    assert data.image_sizes(source) == [source[i]["image"].shape[:2] for i in range(3)]
    batches = list(data.create_eval_iterator(source, batch_size=2, bucket_multiple=32))
    real = sum(int((b["label"] != IGNORE_LABEL).any(axis=(1, 2)).sum()) for b in batches)
    assert real == 3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="shard_index"):
        _train_iterator(_source(), shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="min_scale"):
        pipeline.train_transform(
            np.zeros((4, 4, 3), np.uint8),
            np.zeros((4, 4), np.uint8),
            np.random.default_rng(0),
            crop_size=4,
            min_scale=2.0,
            max_scale=1.0,
        )
