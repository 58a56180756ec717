"""Test-time augmentation (flaxseg.inference): multi-scale, flip, sliding windows, and eval's
use of them: exact sizes, equalities with plain inference, padded batches, bounded compiles."""

import functools
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models
from helpers import set_model

from flaxseg import data, inference, models
from flaxseg import metrics as metrics_lib
from flaxseg.configs import default
from flaxseg.serving.options import InferenceOptions, parse_scales
from flaxseg.training import evaluation, loop, spec
from flaxseg.training import state as state_lib
from flaxseg.training.sharding import create_mesh

NUM_CLASSES = 5


def _kernel(seed, size, symmetric=False):
    kernel = jax.random.normal(jax.random.key(seed), (size, size, 3, NUM_CLASSES))
    return (kernel + kernel[:, ::-1]) / 2 if symmetric else kernel


def conv_fn(kernel, column_weight=0.0):
    """apply_fn of one SAME conv (zero padding, as a padded canvas has), plus optionally a
    term in the absolute column index, which makes the model depend on where the image sits."""

    def apply_fn(images):
        logits = jax.lax.conv_general_dilated(
            images, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        columns = jnp.arange(images.shape[2], dtype=jnp.float32)[None, None, :, None]
        return logits + column_weight * columns * jnp.arange(NUM_CLASSES, dtype=jnp.float32)

    return apply_fn


def plain_probs(apply_fn, images):
    return jax.jit(lambda x: jax.nn.softmax(apply_fn(x), axis=-1))(images)


def predict(apply_fn, images, sizes=None, **options):
    """inference.predict_probs, jitted (eager dispatch of its many small ops is slow)."""
    return jax.jit(functools.partial(inference.predict_probs, apply_fn, **options))(
        images, sizes=sizes
    )


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (2, 37, 45, 3))


def test_scales_one_is_plain_inference(images):
    apply_fn = conv_fn(_kernel(0, 3))
    probs = predict(apply_fn, images, scales=(1.0,))
    np.testing.assert_array_equal(probs, plain_probs(apply_fn, images))


def test_flip_tta_of_flip_equivariant_model_equals_plain(images):
    equivariant = conv_fn(_kernel(0, 3, symmetric=True))  # kernel mirrored left-right
    probs = predict(equivariant, images, flip=True)
    np.testing.assert_allclose(probs, plain_probs(equivariant, images), atol=1e-6)
    # The same check fails for a model that is not flip-equivariant.
    other = conv_fn(_kernel(0, 3))
    flipped = predict(other, images, flip=True)
    assert np.abs(flipped - plain_probs(other, images)).max() > 1e-2


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _reference(apply_fn, image, scales, flip):
    """TTA written out on one unpadded image [1, h, w, 3] with jax.image.resize."""
    _, height, width, _ = image.shape
    total = 0.0
    for scale in scales:
        for flipped in (False, True) if flip else (False,):
            x = image[:, :, ::-1] if flipped else image
            size = (max(1, int(np.floor(height * scale + 0.5))), int(np.floor(width * scale + 0.5)))
            x = jax.image.resize(x, (1, *size, 3), "bilinear", antialias=False)
            probs = jax.nn.softmax(apply_fn(x), axis=-1)
            probs = jax.image.resize(probs, (1, height, width, NUM_CLASSES), "bilinear", False)
            total = total + (probs[:, :, ::-1] if flipped else probs)
    return total / (len(scales) * (2 if flip else 1))


def test_multiscale_flip_matches_written_out_reference_at_odd_size(images):
    apply_fn = conv_fn(_kernel(2, 3))
    scales = (0.5, 0.75, 1.25, 1.75)
    probs = predict(apply_fn, images, scales=scales, flip=True)
    assert probs.shape == (2, 37, 45, NUM_CLASSES)
    expected = jnp.concatenate(
        [_reference(apply_fn, images[i : i + 1], scales, True) for i in (0, 1)]
    )
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_padded_batch_with_sizes_equals_each_image_alone():
    """Two odd-sized images in one zero-padded 64×64 bucket: scaling and flipping act on the
    real image only, so each result is the unpadded image's, cropped exactly, and 0 outside.
    The column term makes the model see where an image sits, so flipping the whole canvas
    instead of the real image would fail."""
    apply_fn = conv_fn(_kernel(3, 3), column_weight=0.05)
    sizes = [(37, 45), (29, 51)]
    alone = [
        jax.random.normal(jax.random.key(10 + i), (1, *size, 3)) for i, size in enumerate(sizes)
    ]
    canvas = jnp.zeros((2, 64, 64, 3))
    for i, (height, width) in enumerate(sizes):
        canvas = canvas.at[i, :height, :width].set(alone[i][0])
    options = dict(scales=(0.5, 1.0, 1.5), flip=True)
    probs = predict(apply_fn, canvas, sizes=jnp.asarray(sizes), **options)
    assert probs.shape == (2, 64, 64, NUM_CLASSES)
    for i, (height, width) in enumerate(sizes):
        expected = predict(apply_fn, alone[i], **options)
        np.testing.assert_allclose(probs[i, :height, :width], expected[0], atol=2e-6)
        assert float(jnp.abs(probs[i, height:]).max()) == 0.0
        assert float(jnp.abs(probs[i, :, width:]).max()) == 0.0


def test_pad_multiple_crops_back_exactly(images):
    apply_fn = conv_fn(_kernel(4, 1))  # per pixel: padding cannot leak into the image
    expected = predict(apply_fn, images, scales=(0.75, 1.5))
    probs = predict(apply_fn, images, scales=(0.75, 1.5), pad_multiple=32)
    assert probs.shape == images.shape[:3] + (NUM_CLASSES,)
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_window_starts_cover_the_image_with_the_last_window_flush():
    assert inference.window_starts(45, 16, 11) == [0, 11, 22, 29]
    assert inference.window_starts(16, 16, 11) == [0]
    assert inference.window_starts(100, 33, 22) == [0, 22, 44, 66, 67]


def test_sliding_windows_equal_whole_image_when_one_window_covers_it(images):
    apply_fn = conv_fn(_kernel(5, 3))
    for window in (45, 64):
        probs = predict(apply_fn, images, window=window)
        np.testing.assert_array_equal(probs, plain_probs(apply_fn, images))


def test_sliding_windows_average_overlapping_windows(images):
    apply_fn = conv_fn(_kernel(6, 3))
    probs = predict(apply_fn, images, window=16, overlap=0.33, window_average="probs")
    # Written out: stride ceil(16 · 0.67) = 11, windows at rows 0, 11, 21 and columns 0, 11,
    # 22, 29, each pixel the mean over the windows that contain it (of the probabilities with
    # window_average='probs'; the default, MMSegmentation's logit average, is checked in
    # test_recipe_corrections.py).
    total = np.zeros((2, 37, 45, NUM_CLASSES))
    count = np.zeros((37, 45, 1))
    for top in (0, 11, 21):
        for left in (0, 11, 22, 29):
            crop = images[:, top : top + 16, left : left + 16]
            total[:, top : top + 16, left : left + 16] += plain_probs(apply_fn, crop)
            count[top : top + 16, left : left + 16] += 1
    np.testing.assert_allclose(probs, total / count, atol=1e-6)
    # A per-pixel model gives the same in every window: sliding equals whole-image inference.
    local = conv_fn(_kernel(7, 1))
    np.testing.assert_allclose(
        predict(local, images, window=16), plain_probs(local, images), atol=1e-6
    )


def test_sliding_windows_combine_with_scales_and_flip(images):
    apply_fn = conv_fn(_kernel(8, 1))  # per pixel, so windows change nothing
    options = dict(scales=(0.5, 1.25), flip=True)
    whole = predict(apply_fn, images, **options)
    windowed = predict(apply_fn, images, window=24, overlap=0.5, **options)
    assert windowed.shape == (2, 37, 45, NUM_CLASSES)
    np.testing.assert_allclose(windowed, whole, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scales=(0.5, 0.0)), r"Every scale must be a positive number, got 0.0"),
        (dict(scales=(-1.0,)), r"Every scale must be a positive number, got -1.0"),
        (dict(scales=()), r"scales must name at least one scale"),
        (dict(window=4, output_stride=8), r"window=4 is smaller than the model's output stride 8"),
        (dict(window=0), r"window must be a positive number of pixels, got 0"),
        (dict(window=64, overlap=1.0), r"overlap must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_options_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        inference.check_options(**kwargs)


def test_bad_scale_in_predict_and_eval_flags(images):
    with pytest.raises(ValueError, match="got -0.5"):
        inference.predict_probs(conv_fn(_kernel(0, 1)), images, scales=(1.0, -0.5))
    with pytest.raises(ValueError, match=r"--scales takes numbers such as 0.5,1.0,1.5, got 'x'"):
        parse_scales(["0.5", "x"])
    assert parse_scales(["0.5", "1", "1.75"]) == (0.5, 1.0, 1.75)


def test_real_tiny_model_tta_keeps_odd_sizes():
    model = models.create_model("deeplabv1", num_classes=NUM_CLASSES, base_width=4, fc_channels=16)
    images = jax.random.normal(jax.random.key(2), (1, 33, 41, 3))
    variables = model.init(jax.random.key(0), images, train=False)
    apply_fn = jax.jit(functools.partial(model.apply, variables, train=False))
    plain = plain_probs(apply_fn, images)
    np.testing.assert_array_equal(
        jax.jit(functools.partial(inference.predict_probs, apply_fn))(images), plain
    )
    tta = jax.jit(
        functools.partial(inference.predict_probs, apply_fn, scales=(1.5,), flip=True, window=24)
    )(images)
    assert tta.shape == (1, 33, 41, NUM_CLASSES)
    np.testing.assert_allclose(tta.sum(-1), 1.0, atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-4  # augmentation really ran


class Conv(nn.Module):
    @nn.compact
    def __call__(self, images, train=False):
        return nn.Conv(NUM_CLASSES, (3, 3), use_bias=False)(images)


@pytest.mark.slow
def test_eval_compiles_once_per_bucket_over_20_sizes_and_matches_per_image_tta():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 61, size=(20, 2))]
    assert len(set(sizes)) == 20
    source = [
        {
            "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "segmentation_mask": rng.integers(0, NUM_CLASSES, (h, w, 1), dtype=np.uint8),
        }
        for h, w in sizes
    ]
    model = Conv()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    state = state_lib.TrainState.create(
        apply_fn=model.apply, tx=optax.set_to_zero(), params=params, batch_stats={}
    )
    mesh = create_mesh()
    options = InferenceOptions(scales=(0.5, 1.0), flip=True)
    eval_fn = evaluation.jit_eval_step(NUM_CLASSES, 255, mesh, options)
    batches = data.create_eval_iterator(
        source, batch_size=2, bucket_multiple=32, ignore_label=255, num_threads=1, with_sizes=True
    )
    confusion = evaluation.evaluate(state, batches, eval_fn, mesh, NUM_CLASSES)
    buckets = {data.pipeline.bucket_shape(h, w, 32) for h, w in sizes}
    assert evaluation.compile_count(eval_fn) == len(buckets) <= 4

    # The same TTA run on each image alone, unpadded (a single linear conv sees the zero
    # padding as its own SAME padding, so padding changes nothing inside the image).
    def apply_fn(images):
        return model.apply({"params": params}, images)

    @jax.jit
    def image_confusion(image, label):  # one compile per image size
        probs = inference.predict_probs(apply_fn, image[None], scales=(0.5, 1.0), flip=True)
        return metrics_lib.confusion_matrix(label[None], jnp.argmax(probs, -1), NUM_CLASSES)

    expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for example in source:
        image, label = data.eval_transform(
            example["image"], example["segmentation_mask"], example["image"].shape[:2]
        )
        expected += np.asarray(image_confusion(image, label))
    np.testing.assert_array_equal(confusion, expected)


def test_to_uint8_recovers_the_pipeline_images():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    image, _ = data.eval_transform(pixels, np.zeros((9, 11), np.uint8), (16, 16))
    recovered = np.asarray(data.to_uint8(jnp.asarray(image)))
    np.testing.assert_array_equal(recovered[:9, :11], pixels)
    np.testing.assert_array_equal(recovered[9:], np.full((7, 16, 3), [124, 116, 104]))


def test_eval_py_refuses_a_bad_scale_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={tmp_path}", "--scales=0.5,0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "eval.py: error: Every scale must be a positive number, got 0.0 in (0.5, 0.0)."
    ]


@pytest.mark.slow
def test_crf_option_refines_the_tta_probabilities():
    """eval's --crf: argmax of dense_crf(the uint8 image, the TTA probabilities) per image."""
    model = Conv()
    images = jax.random.normal(jax.random.key(3), (2, 20, 24, 3))
    params = model.init(jax.random.key(0), images)["params"]
    state = state_lib.TrainState.create(
        apply_fn=model.apply, tx=optax.set_to_zero(), params=params, batch_stats={}
    )
    labels = jax.random.randint(jax.random.key(4), (2, 20, 24), 0, NUM_CLASSES)
    batch = {"image": images, "label": labels, "size": jnp.asarray([[20, 24], [17, 21]])}
    options = InferenceOptions(flip=True, crf=True)
    step = jax.jit(
        functools.partial(
            evaluation.tta_eval_step, num_classes=NUM_CLASSES, ignore_label=255, options=options
        )
    )
    probs = predict(
        lambda x: model.apply({"params": params}, x), images, sizes=batch["size"], flip=True
    )
    refined = jax.vmap(inference.dense_crf)(data.to_uint8(images), probs)
    assert np.any(np.argmax(refined, -1) != np.argmax(probs, -1))  # the CRF changed something
    expected = metrics_lib.confusion_matrix(labels, jnp.argmax(refined, -1), NUM_CLASSES)
    np.testing.assert_array_equal(step(state, batch), expected)


@pytest.mark.slow
def test_eval_workdir_with_tta(tmp_path_factory, data_dir):
    """A trained tiny DeepLab v1: one window covering every (160 px bucket) image gives plain
    inference's mIoU; scales and flip compile the eval step once for the one bucket."""
    config = default.get_config()
    set_model(config, "deeplabv1", kwargs=tiny_models.TINY_KWARGS["deeplabv1"])
    config.dataset = "synthetic"
    config.data_dir = data_dir
    config.crop_size = 48
    config.batch_size = 2
    config.eval_batch_size = 10
    config.eval_bucket_multiple = 160  # synthetic images are ≤ 160 px: one bucket
    config.steps = 2
    config.progress_bar = False
    workdir = tmp_path_factory.mktemp("workdir")
    loop.train_and_evaluate(spec.resolve_config(config), workdir, stop_at_step=2)
    plain = evaluation.evaluate_workdir(workdir)
    assert plain["compilations"] == 1
    windowed = evaluation.evaluate_workdir(workdir, options=InferenceOptions(window=160))
    # Equal up to argmax ties that the softmax creates between near-equal logits.
    assert windowed["miou"] == pytest.approx(plain["miou"], abs=1e-6)
    tta = evaluation.evaluate_workdir(
        workdir, options=InferenceOptions(scales=(0.5, 1.0), flip=True)
    )
    assert tta["compilations"] == 1
    assert 0.0 <= tta["miou"] <= 1.0 and tta["miou"] != plain["miou"]
    with pytest.raises(ValueError, match="window=4 is smaller than the model's output stride 8"):
        evaluation.evaluate_workdir(workdir, options=InferenceOptions(window=4))
