"""Adversaries of Luc et al. 2016 (flaxseg.models.adversarial): input encodings, output shapes
of every net × encoding, parameter counts from the paper's layer lists, one trained alone, and
the errors a user can cause."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from flaxseg.models import adversarial

NUM_CLASSES = 4
TINY_WIDTH = 1 / 16  # 96 -> 6 channels, 512 -> 32
IGNORE = 255


def _variables(model, image, encoded, seed=0):
    """He-scaled random params of the right shapes without compiling ``init``."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), image, encoded)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "kernel":
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        else:
            value = np.zeros(leaf.shape)
        return np.asarray(value, leaf.dtype)

    return {"params": jax.tree_util.tree_map_with_path(fill, shapes["params"])}


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _batch(batch=2, height=32, width=32, num_classes=NUM_CLASSES, seed=0, ignored=0.1):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(batch, height, width))
    labels[rng.random(labels.shape) < ignored] = IGNORE
    probs = jax.nn.softmax(3.0 * rng.normal(size=(batch, height, width, num_classes)), axis=-1)
    return jnp.asarray(image), jnp.asarray(labels), jnp.asarray(probs, jnp.float32)


# ----------------------------------------------------------------------------- names


def test_names_encodings_and_defaults():
    assert adversarial.list_adversaries() == [
        "largefov",
        "largefov_light",
        "smallfov",
        "smallfov_light",
        "stanford",
    ]
    assert set(adversarial.ADVERSARIES) == set(adversarial.list_adversaries())
    assert adversarial.ENCODINGS == ("basic", "product", "scaling")
    assert adversarial.DEFAULT_TAU == 0.9
    assert adversarial.input_channels("basic", 21) == 21
    assert adversarial.input_channels("scaling", 21) == 21
    assert adversarial.input_channels("product", 21) == 63


def test_image_branch_defaults_follow_the_paper():
    def has_image(name, encoding, use_image=None):
        return adversarial.create_adversary(
            name, encoding=encoding, num_classes=3, use_image=use_image
        ).has_image_branch

    # The Stanford net is two-branch; the VOC nets see the map alone; product carries the image.
    assert has_image("stanford", "basic") and has_image("stanford", "scaling")
    assert not has_image("stanford", "product")
    for name in ("largefov", "largefov_light", "smallfov", "smallfov_light"):
        for encoding in adversarial.ENCODINGS:
            assert not has_image(name, encoding)
        assert has_image(name, "basic", use_image=True)
    assert not has_image("stanford", "basic", use_image=False)


# ----------------------------------------------------------------------------- encodings


def test_basic_real_is_one_hot_and_fake_is_the_prediction():
    image, labels, probs = _batch()
    real = adversarial.real_input(image, labels, probs, encoding="basic", num_classes=NUM_CLASSES)
    fake = adversarial.fake_input(image, labels, probs, encoding="basic")
    valid = np.asarray(labels != IGNORE)[..., None]
    one_hot = np.eye(NUM_CLASSES)[np.where(valid[..., 0], labels, 0)]
    assert real.dtype == jnp.float32 and real.shape == probs.shape
    np.testing.assert_array_equal(real, one_hot * valid)
    np.testing.assert_allclose(fake, np.asarray(probs) * valid, rtol=1e-6)


def test_product_has_image_channel_times_class_map_channels():
    image, labels, probs = _batch()
    real = adversarial.real_input(image, labels, probs, encoding="product", num_classes=NUM_CLASSES)
    fake = adversarial.fake_input(image, labels, probs, encoding="product")
    basic_real = adversarial.real_input(
        image, labels, probs, encoding="basic", num_classes=NUM_CLASSES
    )
    basic_fake = adversarial.fake_input(image, labels, probs, encoding="basic")
    assert real.shape == fake.shape == (*labels.shape, 3 * NUM_CLASSES)
    for k in range(3):
        for c in range(NUM_CLASSES):
            channel = k * NUM_CLASSES + c
            np.testing.assert_allclose(real[..., channel], image[..., k] * basic_real[..., c])
            np.testing.assert_allclose(
                fake[..., channel], image[..., k] * basic_fake[..., c], rtol=1e-6
            )


def test_scaling_keeps_tau_on_the_true_class_and_follows_the_prediction_elsewhere():
    tau = 0.9
    image, labels, probs = _batch(height=16, width=16, seed=1)
    # Some pixels already confident (s_l ≥ τ) on their label, one exactly certain.
    probs = np.array(probs)
    confident = np.zeros(labels.shape, bool)
    confident[:, ::3, ::2] = True
    confident &= np.asarray(labels != IGNORE)
    b, h, w = np.nonzero(confident)
    probs[b, h, w] = 0.02 / (NUM_CLASSES - 1)
    probs[b, h, w, np.asarray(labels)[b, h, w]] = 0.98
    probs[0, 0, 3] = np.eye(NUM_CLASSES)[int(labels[0, 0, 3]) % NUM_CLASSES]
    probs = jnp.asarray(probs)

    real = np.asarray(
        adversarial.real_input(
            image, labels, probs, encoding="scaling", num_classes=NUM_CLASSES, tau=tau
        )
    )
    fake = np.asarray(adversarial.fake_input(image, labels, probs, encoding="scaling"))
    valid = np.asarray(labels != IGNORE)
    lab = np.where(valid, labels, 0)
    s = np.asarray(probs, np.float64)
    true_prob = np.take_along_axis(s, lab[..., None], -1)[..., 0]

    assert real.dtype == np.float32
    on_label = np.take_along_axis(real, lab[..., None], -1)[..., 0]
    assert np.all(on_label[valid] >= tau - 1e-6)
    np.testing.assert_allclose(real.sum(-1)[valid], 1.0, atol=1e-5)
    # The paper's formula, written out independently.
    y_l = np.maximum(tau, true_prob)
    expected = s * ((1 - y_l) / np.maximum(1 - true_prob, 1e-12))[..., None]
    np.put_along_axis(expected, lab[..., None], y_l[..., None], -1)
    np.testing.assert_allclose(real[valid], expected[valid], atol=1e-5)
    # Where the prediction already puts ≥ τ on the label, the real map is the prediction.
    assert confident.any()
    np.testing.assert_allclose(real[confident], s[confident], atol=1e-6)
    # Ignored pixels: the zero vector, in real and fake alike.
    assert (~valid).any()
    assert not real[~valid].any() and not fake[~valid].any()
    np.testing.assert_allclose(fake[valid], s[valid], rtol=1e-6)
    # τ = 1 is the plain one-hot ground truth.
    hard = adversarial.real_input(
        image, labels, probs, encoding="scaling", num_classes=NUM_CLASSES, tau=1.0
    )
    np.testing.assert_allclose(hard, np.eye(NUM_CLASSES)[lab] * valid[..., None], atol=1e-6)


@pytest.mark.parametrize("encoding", adversarial.ENCODINGS)
def test_ignored_pixels_give_the_same_zero_vector_real_and_fake(encoding):
    image, labels, probs = _batch(ignored=0.3)
    # Any ignore label works, also one inside [0, C): class 3 becomes "ignore".
    for ignore_label in (IGNORE, 3):
        real = adversarial.real_input(
            image,
            labels,
            probs,
            encoding=encoding,
            num_classes=NUM_CLASSES,
            ignore_label=ignore_label,
        )
        fake = adversarial.fake_input(
            image, labels, probs, encoding=encoding, ignore_label=ignore_label
        )
        ignored = np.asarray((labels == ignore_label) | (labels == IGNORE))
        assert ignored.any()
        assert real.shape == fake.shape
        assert real.shape[-1] == adversarial.input_channels(encoding, NUM_CLASSES)
        np.testing.assert_array_equal(real[ignored], 0.0)
        np.testing.assert_array_equal(fake[ignored], 0.0)
        assert np.abs(np.asarray(fake)[~ignored]).sum(-1).min() > 0


def test_real_input_sends_no_gradient_into_the_prediction_and_fake_does():
    image, labels, probs = _batch(height=8, width=8)

    def total(fn, p):
        return jnp.sum(fn(p) * jnp.arange(1, NUM_CLASSES + 1))

    real = functools.partial(
        adversarial.real_input, image, labels, encoding="scaling", num_classes=NUM_CLASSES
    )
    fake = functools.partial(adversarial.fake_input, image, labels, encoding="scaling")
    assert not jax.grad(functools.partial(total, real))(probs).any()
    assert jax.grad(functools.partial(total, fake))(probs).any()


# ----------------------------------------------------------------------------- networks


def _case_ids():
    for name in adversarial.list_adversaries():
        for encoding in adversarial.ENCODINGS:
            for use_image in (False, True):
                yield name, encoding, use_image


@pytest.mark.parametrize("name,encoding,use_image", list(_case_ids()))
def test_every_adversary_and_encoding_gives_one_float32_logit_per_image(name, encoding, use_image):
    image, labels, probs = _batch(batch=3, height=33, width=45)
    model = adversarial.create_adversary(
        name, encoding=encoding, num_classes=NUM_CLASSES, use_image=use_image, width=TINY_WIDTH
    )
    real = adversarial.real_input(image, labels, probs, encoding=encoding, num_classes=NUM_CLASSES)
    fake = adversarial.fake_input(image, labels, probs, encoding=encoding)
    variables = _variables(model, image, real)
    has_image = any(key.startswith("image") for key in variables["params"])
    assert has_image == use_image
    logits = jax.jit(lambda v, x, e: model.apply(v, x, e, train=False))(variables, image, real)
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    fake_logits = jax.jit(model.apply)(variables, image, fake)
    assert fake_logits.shape == (3,) and not np.allclose(logits, fake_logits)


def test_image_branch_sees_the_image_only_when_present():
    image, labels, probs = _batch()
    encoded = adversarial.fake_input(image, labels, probs, encoding="basic")
    for use_image in (False, True):
        model = adversarial.create_adversary(
            "stanford",
            encoding="basic",
            num_classes=NUM_CLASSES,
            use_image=use_image,
            width=TINY_WIDTH,
        )
        variables = _variables(model, image, encoded)
        apply = jax.jit(model.apply)
        changed = not np.allclose(
            apply(variables, image, encoded), apply(variables, -image, encoded)
        )
        assert changed == use_image


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7)])
def test_tiny_maps_pass_because_the_pools_round_up(size):
    image, labels, probs = _batch(batch=1, height=size[0], width=size[1], ignored=0.0)
    model = adversarial.create_adversary(
        "largefov", encoding="basic", num_classes=NUM_CLASSES, width=TINY_WIDTH
    )
    encoded = adversarial.fake_input(image, labels, probs, encoding="basic")
    logits = model.apply(_variables(model, image, encoded), image, encoded)
    assert logits.shape == (1,) and np.isfinite(logits).all()


def _conv_params(layers, in_channels):
    """Weights + biases of a chain of ('conv', features, kernel) / 'pool' layers."""
    total, channels = 0, in_channels
    for layer in layers:
        if layer == "pool":
            continue
        features, kernel = layer
        total += kernel * kernel * channels * features + features
        channels = features
    return total, channels


def _field_of_view(layers):
    """Receptive field of one output location over the map: each k×k conv adds (k − 1)·jump,
    each 2×2 stride-2 pool adds jump and doubles it."""
    field, jump = 1, 1
    for layer in layers:
        if layer == adversarial.POOL:
            field, jump = field + jump, 2 * jump
        else:
            field += (layer[1] - 1) * jump
    return field


@pytest.mark.parametrize(
    "name,field",
    [("largefov", 34), ("largefov_light", 34), ("smallfov", 18), ("smallfov_light", 18)],
)
def test_voc_nets_have_the_papers_fields_of_view(name, field):
    spec = adversarial.ADVERSARIES[name].SPEC
    layers = (*spec.label_branch, *spec.trunk, (1, spec.output_kernel))
    assert _field_of_view(layers) == field


def test_full_width_parameter_counts_match_the_papers_layer_lists():
    # The paper's tables, written out layer by layer; the output layer has one channel (the
    # logit of 'real') instead of the paper's two softmax scores.
    voc_classes = 21
    largefov = [(96, 3), (128, 3), (128, 3), "pool", (256, 3), (256, 3), "pool", (512, 3), (1, 3)]
    smallfov = [(96, 3), (128, 1), "pool", (256, 3), (256, 1), "pool", (512, 3), (1, 1)]
    expected_largefov, _ = _conv_params(largefov, voc_classes)
    expected_smallfov_product, _ = _conv_params(smallfov, 3 * voc_classes)
    # Stanford Background (8 classes): label 5×5 64 ‖ image 5×5 16 → 5×5 64, then 128 → ...
    label_branch, label_out = _conv_params([(64, 5)], 8)
    image_branch, image_out = _conv_params([(16, 5), (64, 5)], 3)
    trunk, _ = _conv_params(
        [(128, 3), "pool", (256, 3), "pool", (512, 3), (1, 3)], label_out + image_out
    )
    expected_stanford = label_branch + image_branch + trunk
    # By hand: 18,240 + 110,720 + 147,584 + 295,168 + 590,080 + 1,180,160 + 4,609.
    assert expected_largefov == 2_346_561

    def count(name, encoding, num_classes):
        model = adversarial.create_adversary(
            name, encoding=encoding, num_classes=num_classes, dtype=jnp.bfloat16
        )
        channels = adversarial.input_channels(encoding, num_classes)
        shapes = jax.eval_shape(
            model.init,
            jax.random.key(0),
            jnp.zeros((1, 64, 64, 3)),
            jnp.zeros((1, 64, 64, channels)),
        )
        leaves = jax.tree.leaves(shapes["params"])
        assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # params float32, compute bf16
        return _count(shapes["params"])

    assert count("largefov", "basic", voc_classes) == expected_largefov
    assert count("smallfov", "product", voc_classes) == expected_smallfov_product
    assert count("stanford", "basic", 8) == expected_stanford


def test_bfloat16_compute_still_returns_float32_logits():
    image, labels, probs = _batch()
    encoded = adversarial.fake_input(image, labels, probs, encoding="basic")
    model = adversarial.create_adversary(
        "smallfov_light",
        encoding="basic",
        num_classes=NUM_CLASSES,
        dtype=jnp.bfloat16,
        width=TINY_WIDTH,
    )
    logits = jax.jit(model.apply)(_variables(model, image, encoded), image, encoded)
    assert logits.shape == (2,) and logits.dtype == jnp.float32


# ----------------------------------------------------------------------------- training


def _blob_maps(count, size, num_classes, rng):
    """Label maps of random smooth blobs (argmax of upsampled noise) as one-hot float maps, and
    the same maps blurred by a 5×5 box filter (a stand-in for a segmenter's soft softmax)."""
    noise = rng.normal(size=(count, 4, 4, num_classes))
    smooth = ndimage.zoom(noise, (1, size / 4, size / 4, 1), order=1)
    labels = smooth.argmax(-1)
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    blurred = ndimage.uniform_filter(one_hot, size=(1, 5, 5, 1), mode="nearest")
    blurred /= blurred.sum(-1, keepdims=True)
    return one_hot, blurred.astype(np.float32)


@pytest.mark.slow
def test_an_adversary_trained_alone_separates_one_hot_maps_from_blurred_ones():
    size, num_classes, batch = 32, NUM_CLASSES, 16
    rng = np.random.default_rng(0)
    train_real, train_fake = _blob_maps(256, size, num_classes, rng)
    test_real, test_fake = _blob_maps(64, size, num_classes, rng)
    model = adversarial.create_adversary(
        "largefov_light", encoding="basic", num_classes=num_classes, width=1 / 8
    )
    image = jnp.zeros((batch, size, size, 3))  # the basic encoding ignores the image
    params = _variables(model, image, jnp.asarray(train_real[:batch]))["params"]
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, real, fake):
        def loss_fn(p):
            real_logits = model.apply({"params": p}, image, real)
            fake_logits = model.apply({"params": p}, image, fake)
            return jnp.mean(
                optax.sigmoid_binary_cross_entropy(real_logits, jnp.ones_like(real_logits))
                + optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
            )

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for _ in range(150):
        idx = rng.integers(0, len(train_real), size=batch)
        params, opt_state, loss = step(params, opt_state, train_real[idx], train_fake[idx])

    apply = jax.jit(lambda p, e: model.apply({"params": p}, jnp.zeros((*e.shape[:3], 3)), e))
    real_logits = np.asarray(apply(params, jnp.asarray(test_real)))
    fake_logits = np.asarray(apply(params, jnp.asarray(test_fake)))
    accuracy = (np.mean(real_logits > 0) + np.mean(fake_logits < 0)) / 2
    assert accuracy > 0.9, (accuracy, float(loss))


# ----------------------------------------------------------------------------- bad inputs


def test_bad_arguments_get_one_clear_sentence():
    image, labels, probs = _batch(height=4, width=4)
    with pytest.raises(ValueError, match=r"Unknown adversary network 'vgg'; valid networks: "):
        adversarial.create_adversary("vgg", encoding="basic", num_classes=3)
    with pytest.raises(ValueError, match=r"Unknown adversarial encoding 'onehot'; valid "):
        adversarial.create_adversary("largefov", encoding="onehot", num_classes=3)
    for call in (
        lambda: adversarial.input_channels("soft", 3),
        lambda: adversarial.fake_input(image, labels, probs, encoding="soft"),
        lambda: adversarial.real_input(image, labels, probs, encoding="soft", num_classes=4),
    ):
        with pytest.raises(ValueError, match="'basic', 'product', 'scaling'"):
            call()
    for num_classes in (0, -2):
        with pytest.raises(ValueError, match=f"num_classes must be at least 1, got {num_classes}"):
            adversarial.create_adversary("smallfov", encoding="basic", num_classes=num_classes)
        with pytest.raises(ValueError, match="num_classes must be at least 1"):
            adversarial.input_channels("product", num_classes)
        with pytest.raises(ValueError, match="num_classes must be at least 1"):
            adversarial.real_input(image, labels, probs, encoding="basic", num_classes=num_classes)
    for tau in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match=r"tau .* must be in \(0, 1\], got"):
            adversarial.real_input(
                image, labels, probs, encoding="scaling", num_classes=NUM_CLASSES, tau=tau
            )
    with pytest.raises(ValueError, match="width must be positive"):
        adversarial.create_adversary("largefov", encoding="basic", num_classes=3, width=0)
    with pytest.raises(ValueError, match="probs has 4 classes but num_classes is 5"):
        adversarial.real_input(image, labels, probs, encoding="basic", num_classes=5)
    model = adversarial.create_adversary(
        "largefov", encoding="product", num_classes=NUM_CLASSES, width=TINY_WIDTH
    )
    with pytest.raises(ValueError, match=r"takes \[B, H, W, 12\] maps, got \(2, 4, 4, 4\)"):
        model.init(jax.random.key(0), image, probs)
