"""Adversarial training (Luc et al. 2016) around any flaxseg segmenter: where the gradients go,
what ignored pixels do, and a run on the synthetic set that checkpoints, resumes exactly and
evaluates like any other."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config
from model_helpers import random_variables

from flaxseg import losses, models
from flaxseg.configs import default
from flaxseg.models import adversarial as adversarial_models
from flaxseg.serving import checkpoints
from flaxseg.training import adversarial, evaluation, loop, spec, steps
from flaxseg.training import state as state_lib

pytestmark = pytest.mark.slow  # trains adversarial runs

NUM_CLASSES = 5
ADVERSARY = dict(width=0.125)


def _batch(seed=0, size=40):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, (2, size, size)).astype(np.int32)
    labels[:, :4] = 255  # a void band
    return {
        "image": jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32),
        "label": jnp.asarray(labels),
    }


def _state(encoding="basic", seed=0, size=40):
    model = models.create_model(
        "deeplabv3", num_classes=NUM_CLASSES, backbone="resnet18", base_width=4, aspp_channels=8
    )
    variables = random_variables(model, jnp.zeros((1, size, size, 3)), seed=seed)
    state = state_lib.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.01),
        batch_stats=variables["batch_stats"],
    )
    adversary = adversarial.init_adversary(
        "largefov_light",
        encoding=encoding,
        num_classes=NUM_CLASSES,
        input_shape=(1, size, size, 3),
        rng=jax.random.key(seed + 1),
        tx=optax.adam(1e-3),
        **ADVERSARY,
    )
    return state.replace(adversary=adversary)


def _changed(a, b):
    return [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


@pytest.mark.parametrize("encoding", adversarial_models.ENCODINGS)
def test_adversary_updates_send_nothing_to_the_segmenter(encoding):
    state, batch = _state(encoding), _batch()
    step = jax.jit(
        functools.partial(
            adversarial.pretrain_step, encoding=encoding, num_classes=NUM_CLASSES, ignore_label=255
        )
    )
    new, metrics = step(state, batch, jax.random.key(0))
    assert not any(_changed(state.params, new.params))  # bit-identical segmenter
    assert not any(_changed(state.batch_stats, new.batch_stats))
    assert all(_changed(state.adversary.params, new.adversary.params))
    assert int(new.step) == int(state.step) + 1 and np.isfinite(float(metrics["adversary_loss"]))
    for key in ("adversary_accuracy_real", "adversary_accuracy_fake"):
        assert 0.0 <= float(metrics[key]) <= 1.0


def test_adversarial_term_reaches_every_segmenter_parameter():
    state, batch = _state(), _batch()
    _, fake = adversarial.encoders("basic", NUM_CLASSES, 255, 0.9)

    def term(params):
        logits, _ = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0)},
        )
        probs = jax.nn.softmax(logits, axis=-1)
        return adversarial.fooling_loss(
            state.adversary.params, state.adversary.apply_fn, batch, fake(batch, probs)
        )

    grads = jax.grad(term)(state.params)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) >= 0.9 * len(norms)

    # Through the real step: λ > 0 changes the segmenter's update, λ = 0 is the plain loss.
    ce = losses.build_loss("cross_entropy", num_classes=NUM_CLASSES)
    step = functools.partial(
        adversarial.train_step,
        loss_fn=ce,
        encoding="basic",
        num_classes=NUM_CLASSES,
        ignore_label=255,
    )
    with_term, metrics = jax.jit(
        functools.partial(step, adv_weight=1.0, adv_normalization="images")
    )(state, batch, jax.random.key(0))
    without, _ = jax.jit(functools.partial(step, adv_weight=0.0))(state, batch, jax.random.key(0))
    assert any(_changed(with_term.params, without.params))
    assert not any(_changed(with_term.adversary.params, without.adversary.params))
    assert set(metrics) >= {"loss", "cross_entropy", "adversarial", "adversary_loss"}
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["cross_entropy"]) + float(metrics["adversarial"]), rel=1e-5
    )


def _softplus(x):
    return np.logaddexp(0.0, x)


@pytest.mark.parametrize("input_stride", [1, 4])
def test_segmenter_loss_is_the_papers_summed_form_over_the_pixel_count(input_stride):
    """Luc et al.: per image, cross-entropy summed over its pixels + λ·BCE. flaxseg's default
    divides that batch sum by the N non-ignored pixels: (Σ CE + λ·Σ_n BCE_n) / N."""
    weight, state, batch, rng = 0.1, _state(), _batch(), jax.random.key(5)
    ce = losses.build_loss("cross_entropy", num_classes=NUM_CLASSES)
    new, metrics = jax.jit(
        functools.partial(
            adversarial.train_step,
            loss_fn=ce,
            encoding="basic",
            num_classes=NUM_CLASSES,
            ignore_label=255,
            adv_weight=weight,
            input_stride=input_stride,
        )
    )(state, batch, rng)

    # The segmenter's logits in the update (train mode, the step's dropout key), by hand.
    logits, _ = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats", "aux"],
        rngs={"dropout": steps.step_rng(rng, state.step)},
    )
    logits, labels = np.asarray(logits, np.float64), np.asarray(batch["label"])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != 255
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    summed_ce, pixels = -picked[valid].sum(), valid.sum()

    # The adversary (as updated before the segmenter's step) on the fake maps it saw:
    # the softmax sampled every `input_stride` pixels from (stride - 1) // 2, ignored pixels 0.
    start = (input_stride - 1) // 2
    probs = np.exp(log_probs)[:, start::input_stride, start::input_stride]
    fake = probs * valid[:, start::input_stride, start::input_stride, None]
    adv = new.adversary
    scores = np.asarray(adv.apply_fn({"params": adv.params}, None, jnp.asarray(fake, jnp.float32)))
    bce = _softplus(-scores.astype(np.float64))  # BCE(a(x, s(x)), 1) per image
    assert fake.shape[1] == -(-(40 - start) // input_stride)

    expected = (summed_ce + weight * bce.sum()) / pixels
    assert float(metrics["loss"]) == pytest.approx(expected, rel=2e-5)
    assert float(metrics["adversarial"]) == pytest.approx(bce.mean(), rel=2e-5)
    # The old scale, mean CE + λ·mean BCE, is ~N/B times heavier on the adversarial term.
    old = summed_ce / pixels + weight * bce.mean()
    assert abs(old - expected) > 100 * 2e-5 * expected


def test_adversarial_weight_uses_the_global_pixel_count():
    labels = np.zeros((2, 4, 5), np.int32)
    labels[0, :2] = 255  # 30 valid pixels in 2 images
    weight = adversarial.adversarial_weight(0.5, jnp.asarray(labels), ignore_label=255)
    assert float(weight) == pytest.approx(0.5 * 2 / 30)
    assert (
        adversarial.adversarial_weight(0.5, labels, ignore_label=255, normalization="images") == 0.5
    )
    # Under pmap (here vmap, the same named-axis collectives): images and pixels are summed
    # over the axis, 4 images and 2 × 30 pixels.
    per_device = jax.vmap(
        functools.partial(adversarial.adversarial_weight, 0.5, ignore_label=255, axis_name="d"),
        axis_name="d",
    )(jnp.asarray(np.stack([labels, labels])))
    np.testing.assert_allclose(np.asarray(per_device), 0.5 * 4 / 60, rtol=1e-6)
    with pytest.raises(ValueError, match="adv_normalization='mean' is not one of pixels, images"):
        adversarial.adversarial_weight(0.5, labels, ignore_label=255, normalization="mean")


def test_adversary_view_samples_image_labels_and_logits_alike():
    batch = _batch()
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 40, 40, NUM_CLASSES)))
    same, same_logits = adversarial.adversary_view(batch, logits, 1)
    assert same is batch and same_logits is logits  # stride 1: the full-resolution maps
    view, sampled = adversarial.adversary_view(batch, logits, 8)
    for got, full in ((view["image"], batch["image"]), (view["label"], batch["label"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(full)[:, 3::8, 3::8])
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(logits)[:, 3::8, 3::8])
    assert sampled.shape[1:3] == (5, 5)


@pytest.mark.parametrize(
    "adversary, weight, stride",
    [
        ("largefov", 1.0, 8),
        ("largefov_light", 1.0, 8),
        ("smallfov", 0.1, 8),
        ("smallfov_light", 1.0, 8),
        ("stanford", 1.0, 4),
    ],
)
def test_unset_weight_and_stride_take_the_adversarys_paper_values(adversary, weight, stride):
    # λ: the Chainer reimplementation's per-adversary table (Stanford: ours); strides: the
    # segmenter's output resolution in the paper's experiments (Dilated-8: 1/8, Farabet: 1/4).
    config = default.get_config()
    config.adversarial, config.adversary = "basic", adversary
    assert config.adv_weight is None and config.adv_input_stride is None
    assert config.adv_normalization == "pixels"
    resolved = spec.resolve_config(config)
    assert (resolved.adv_weight, resolved.adv_input_stride) == (weight, stride)
    assert adversarial_models.PAPER_DEFAULTS[adversary] == {
        "weight": weight,
        "input_stride": stride,
    }
    config.adv_weight, config.adv_input_stride = 0.3, 1  # set values stay
    resolved = spec.resolve_config(config)
    assert (resolved.adv_weight, resolved.adv_input_stride) == (0.3, 1)


@pytest.mark.parametrize("encoding", adversarial_models.ENCODINGS)
def test_ignored_pixels_change_neither_loss(encoding):
    state, batch = _state(encoding), _batch()
    real, fake = adversarial.encoders(encoding, NUM_CLASSES, 255, 0.9)
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 40, 40, NUM_CLASSES)), jnp.float32)
    perturbed = logits.at[:, :4].add(jnp.asarray(rng.normal(size=(2, 4, 40, NUM_CLASSES)) * 5))
    adv = state.adversary

    def both(logits):
        probs = jax.nn.softmax(logits, axis=-1)
        loss, _ = adversarial.adversary_loss(
            adv.params, adv.apply_fn, batch, real(batch, probs), fake(batch, probs)
        )
        return loss, adversarial.fooling_loss(adv.params, adv.apply_fn, batch, fake(batch, probs))

    for a, b in zip(both(logits), both(perturbed)):
        assert float(a) == pytest.approx(float(b), abs=1e-6)
    grad = jax.grad(lambda x: both(x)[1])(logits)
    assert float(jnp.abs(grad[:, :4]).max()) == 0.0 and float(jnp.abs(grad).max()) > 0


ADVERSARIAL = dict(
    adversarial="scaling",
    adversary="largefov_light",
    adversary_kwargs=json.dumps(ADVERSARY),
    adv_weight=0.5,
    adv_pretrain_steps=2,
    adv_updates=2,
)


def test_adversarial_run_checkpoints_resumes_exactly_and_evaluates(data_dir, tmp_path):
    config = functools.partial(
        tiny_config, data_dir, steps=6, checkpoint_every=3, log_every=1, **ADVERSARIAL
    )
    straight = loop.train_and_evaluate(config(), tmp_path / "straight")
    history = straight["history"]
    assert "adversary_loss" in history[0] and "loss" not in history[0]  # pre-training
    assert {"loss", "adversarial", "adversary_loss"} <= set(history[-1])
    loop.train_and_evaluate(config(), tmp_path / "resumed", stop_at_step=3)
    resumed = loop.train_and_evaluate(config(), tmp_path / "resumed")
    assert resumed["step"] == 6

    def saved(workdir, step):
        manager = checkpoints.create_manager(workdir, read_only=True)
        return checkpoints.restore(manager, step)["state"]

    a, b = saved(tmp_path / "straight", 6), saved(tmp_path / "resumed", 6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert any(
        _changed(saved(tmp_path / "straight", 3)["adversary"]["params"], a["adversary"]["params"])
    )
    assert evaluation.evaluate_workdir(tmp_path / "straight")["miou"] == pytest.approx(
        straight["miou"], abs=1e-6
    )

    # The adversary is part of the state: resuming without it is refused, workdir untouched.
    with pytest.raises(ValueError, match=r"different model.*adversarial="):
        loop.train_and_evaluate(tiny_config(data_dir, steps=8), tmp_path / "straight")

    # Adversarial fine-tuning of a trained plain segmenter (--init_from).
    loop.train_and_evaluate(tiny_config(data_dir, steps=2, checkpoint_every=2), tmp_path / "plain")
    tuned = loop.train_and_evaluate(
        config(steps=3, init_from=str(tmp_path / "plain")), tmp_path / "tuned"
    )
    assert tuned["step"] == 3


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("adv_normalization", "mean", r"--config.adv_normalization='mean' is not one of pixels"),
        ("adv_input_stride", 0, r"--config.adv_input_stride must be a positive integer, got 0"),
    ],
)
def test_bad_adversarial_scale_or_stride_get_one_sentence(field, value, message):
    config = default.get_config()
    config.adversarial = "basic"
    config[field] = value
    with pytest.raises(ValueError, match=message):
        spec.validate_adversarial(spec.resolve_config(config))
