"""Issue 22's recipe and default corrections (items 7–14), each checked against its source's
numbers or formula: FCN's decay per step, the VGG16 SegNet solver, EfficientNet drop path,
DeepLab v1/v2's loss on the 1/8 score map, BatchNorm momentum, MMSegmentation's slide
inference, U-Net's and timm's initialisation, PSPNet's semseg schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flaxseg import inference, models
from flaxseg.configs import (
    deeplabv1_largefov_voc,
    deeplabv2_voc,
    deeplabv3_voc,
    deeplabv3plus_voc,
    fcn8s_voc,
    fcn16s_voc,
    fcn32s_voc,
    pspnet_voc,
    segnet_voc,
)
from flaxseg.models import layers
from flaxseg.models.backbones.efficientnet import EfficientNet
from flaxseg.models.backbones.mobilenetv2 import MobileNetV2
from flaxseg.serving import restore
from flaxseg.training import loop, optim, spec, steps
from flaxseg.training import state as state_lib
from flaxseg.training.sharding import create_mesh, shard_batch


def _param_groups(model, config, size=32):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return optim.param_groups(variables["params"], config.param_groups, config.weight_decay)


# --------------------------------------------------------------------- 7. FCN's weight decay


@pytest.mark.parametrize(
    "recipe, caffe_base_lr",
    [(fcn32s_voc, 1e-10), (fcn16s_voc, 1e-12), (fcn8s_voc, 1e-14)],
)
def test_fcn_recipes_decay_per_step_equals_caffes(recipe, caffe_base_lr):
    config = recipe.get_config()
    caffe_weight_decay = 5e-4  # every voc-fcn*/solver.prototxt
    # The rate is scaled up for the per-pixel mean loss; the decay down by the same factor.
    assert config.lr == pytest.approx(caffe_base_lr * 500 * 375, rel=1e-12)
    assert config.lr * config.weight_decay == pytest.approx(
        caffe_base_lr * caffe_weight_decay, rel=1e-12
    )
    # The optimiser's first update of a kernel with zero gradient is exactly that decay step.
    tx = optim.create_optimizer(
        learning_rate=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        param_groups=config.param_groups,
    )
    params = {"score_fr": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(
        updates["score_fr"]["kernel"], -caffe_base_lr * caffe_weight_decay, rtol=1e-6
    )
    np.testing.assert_array_equal(updates["score_fr"]["bias"], 0.0)  # biases: decay_mult 0
    groups = _param_groups(
        models.create_model(config.model.name, num_classes=3, base_width=4, fc_channels=8),
        config,
        64,
    )
    for name, group in groups.items():
        if name.startswith("upscore"):
            assert group["lr_mult"] == 0.0, name
        elif name.endswith("/bias"):
            assert (group["lr_mult"], group["weight_decay"]) == (2.0, 0.0), name
        else:
            assert (group["lr_mult"], group["weight_decay"]) == (1.0, config.weight_decay), name


# ------------------------------------------------------------------ 8. SegNet (VGG16) solver


def test_segnet_recipe_is_the_vgg16_segnet_solver():
    config = segnet_voc.get_config()
    # SegNet-Tutorial Models/segnet_solver.prototxt and segnet_train.prototxt's batch_size.
    assert (config.lr, config.batch_size, config.steps) == (0.001, 4, 40_000)
    assert (config.lr_schedule, config.momentum, config.weight_decay) == ("constant", 0.9, 5e-4)
    groups = _param_groups(models.create_model("segnet", num_classes=3, base_width=4), config)
    expected = {
        "conv/kernel": (1.0, 5e-4),  # decoder convs
        "conv/bias": (2.0, 0.0),
        "bn/scale": (1.0, 5e-4),  # BN scale: lr_mult 1, decay_mult 1
        "bn/bias": (1.0, 0.0),  # BN shift: lr_mult 1, decay_mult 0
    }
    checked = set()
    for name, group in groups.items():
        got = (group["lr_mult"], group["weight_decay"])
        if name.startswith("encoder/"):  # torchvision vgg16_bn features.<i>
            index = int(name.split("/")[1].split("_")[1])
            batchnorm = index in (1, 4, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38, 41)
            kind = ("bn/" if batchnorm else "conv/") + name.rsplit("/", 1)[1]
        elif name.startswith("classifier/"):
            kind = "conv/" + name.rsplit("/", 1)[1]
        else:
            kind = "/".join(name.split("/")[-2:])
        assert got == expected[kind], (name, got)
        checked.add(kind)
    assert checked == set(expected)


# -------------------------------------------------------------------- 14. PSPNet: semseg's


def test_pspnet_recipe_follows_semseg():
    config = pspnet_voc.get_config()
    # 50 epochs of floor(ceil(10582 / 8 GPUs) / 2 per GPU) = 661 steps (drop_last=True).
    assert config.steps == 50 * 661 == 33_050
    assert (config.lr, config.batch_size, config.weight_decay) == (0.01, 16, 1e-4)
    model = models.create_model(
        "pspnet", num_classes=3, backbone="resnet18", base_width=4, head_channels=8, aux_channels=8
    )
    groups = _param_groups(model, config)
    assert any(name.endswith(("/bias", "/scale")) for name in groups)
    for name, group in groups.items():  # semseg decays every parameter, BN and biases too
        new_module = name.split("/")[0] in ("ppm", "head", "aux_head")
        assert (group["lr_mult"], group["weight_decay"]) == (10.0 if new_module else 1.0, 1e-4)


# -------------------------------------------------- 9. EfficientNet drop path (stochastic depth)


def _variants(images, name, **kwargs):
    """``build(**changes)``: tiny model ``name`` with ``kwargs`` and ``changes``, and the
    variables of ``build()`` (one init, shared by every variant: none adds a variable)."""

    def build(**changes):
        return models.create_model(name, num_classes=3, **{**kwargs, **changes})

    return build, jax.jit(build().init)(jax.random.key(1), images)


def _train_mode(model, variables, images, key):
    """``model`` in train mode: (logits, the batch-statistics updates)."""
    fn = lambda v, x, k: model.apply(  # noqa: E731
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k}
    )
    return jax.jit(fn)(variables, images, key)


@pytest.fixture(scope="module")
def efficientnet_unet():
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    build, variables = _variants(images, "unet", backbone="efficientnet_b0", base_channels=8)

    def run(rate, train, key):
        model = build(drop_path_rate=rate)
        if not train:
            return jax.jit(lambda v, x: model.apply(v, x))(variables, images)
        return _train_mode(model, variables, images, key)[0]

    return run


def test_efficientnet_drop_path_rate_reaches_the_encoder(efficientnet_unet):
    run = efficientnet_unet
    key_a, key_b = jax.random.key(2), jax.random.key(3)
    assert not np.allclose(run(0.2, True, key_a), run(0.2, True, key_b))
    np.testing.assert_array_equal(run(0.0, True, key_a), run(0.0, True, key_b))
    np.testing.assert_array_equal(run(0.2, False, None), run(0.0, False, None))  # eval: off


def test_drop_path_rate_from_model_kwargs_and_refused_elsewhere():
    config = deeplabv3plus_voc.get_config()
    config.num_classes = 3
    config.model.backbone = "efficientnet-b0"
    config.model.kwargs = {"head": "smp", "drop_path_rate": 0.2}
    assert restore.build_model(spec.model_spec(config)).drop_path_rate == 0.2
    with pytest.raises(
        ValueError,
        match=r"stochastic depth\) needs an encoder .*efficientnet-b7.*.resnet18. has none",
    ):
        models.create_model("deeplabv3", num_classes=3, backbone="resnet18", drop_path_rate=0.2)


# ---------------------------------------------------- 10. DeepLab v1/v2: loss on the 1/8 map


def test_shrink_labels_samples_caffe_interp_positions():
    labels = jnp.arange(2 * 321 * 321).reshape(2, 321, 321)
    np.testing.assert_array_equal(steps.shrink_labels(labels, (41, 41)), labels[:, ::8, ::8])
    # (9 − 1) / (4 − 1) = 2.67: positions 0, 2.67, 5.33, 8 -> rows 0, 3, 5, 8.
    labels = jnp.arange(9 * 9).reshape(1, 9, 9)
    np.testing.assert_array_equal(
        steps.shrink_labels(labels, (4, 4)), labels[:, [0, 3, 5, 8]][:, :, [0, 3, 5, 8]]
    )


def _cross_entropy(logits, labels, ignore=255):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != ignore
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return -picked[valid].sum() / valid.sum()


def test_deeplabv1_recipe_loss_is_taken_on_the_stride_8_score_map():
    assert deeplabv2_voc.get_config().loss_resolution == "score_map"
    config = deeplabv1_largefov_voc.get_config()
    assert config.loss_resolution == "score_map"
    config.num_classes = 3
    config.batch_size = 2
    config.model.kwargs.update(base_width=4, fc_channels=8, dropout_rate=0.0)
    config = spec.resolve_config(config)
    spec.validate_config(config)
    model = restore.build_model(spec.model_spec(config))
    tx, _ = loop.create_optimizer(config)
    size = 49  # 49 -> 25 -> 13 -> 7 (Caffe's ceil pools); (49 − 1) / 8 + 1 = 7
    state = state_lib.create_train_state(model, tx, jax.random.key(0), (1, size, size, 3))
    # fc8 starts at N(0, 0.01²): scale it up so that the scores (and the losses) are not ~0.
    params = jax.tree.map(lambda x: x, state.params)
    params["fc8"]["kernel"] = params["fc8"]["kernel"] * 1000.0
    state = state.replace(params=params)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, 3, (2, size, size)).astype(np.int32),
    }
    batch["label"][:, :5] = 255
    variables = {"params": jax.device_get(state.params)}  # the step donates the state
    mesh = create_mesh()
    _, metrics = loop.jit_train_step(config, mesh)(
        state, shard_batch(batch, mesh), jax.random.key(1)
    )

    full = model.apply(variables, batch["image"])
    with layers.score_map_outputs():
        scores = model.apply(variables, batch["image"])
    assert scores.shape == (2, 7, 7, 3)
    # The score map is what the model's output is upsampled from.
    np.testing.assert_allclose(layers.resize_bilinear(scores, (size, size)), full, atol=1e-5)
    expected = _cross_entropy(scores, batch["label"][:, ::8, ::8])
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert abs(_cross_entropy(full, batch["label"]) - expected) > 1e-3


def test_loss_resolution_is_checked():
    config = deeplabv1_largefov_voc.get_config()
    config.num_classes = 3
    config.loss_resolution = "logits"
    with pytest.raises(ValueError, match="--config.loss_resolution='logits' is not one of"):
        spec.validate_config(config)
    config.loss_resolution = "score_map"
    config.adversarial = "basic"
    with pytest.raises(ValueError, match="does not combine with --adversarial"):
        spec.validate_config(config)


# ------------------------------------------------------------------- 11. BatchNorm momentum


def test_deeplabv3_recipes_set_tf_batchnorm_decay():
    for recipe in (deeplabv3_voc, deeplabv3plus_voc):
        assert recipe.get_config().model.kwargs["bn_momentum"] == 0.9997


def test_bn_momentum_moves_running_statistics_by_it():
    images = jax.random.normal(jax.random.key(0), (2, 33, 33, 3)) * 2.0 + 0.5
    build, variables = _variants(
        images, "deeplabv3", backbone="resnet18", base_width=4, aspp_channels=8
    )
    stats = {}
    for momentum in (None, 0.9997):
        _, updates = _train_mode(build(bn_momentum=momentum), variables, images, jax.random.key(2))
        stats[momentum] = traverse_util.flatten_dict(updates["batch_stats"])
    old = traverse_util.flatten_dict(variables["batch_stats"])
    assert old.keys() == stats[None].keys() == stats[0.9997].keys()  # no variable changes
    for path, start in old.items():
        # new = m·old + (1 − m)·batch statistic, the batch statistic being the same for both.
        batch_default = (stats[None][path] - 0.9 * start) / 0.1
        batch_tf = (stats[0.9997][path] - 0.9997 * start) / 0.0003
        np.testing.assert_allclose(batch_tf, batch_default, rtol=2e-3, atol=2e-3, err_msg=path)
    with pytest.raises(ValueError, match=r"bn_momentum must be in \[0, 1\), got 1.5"):
        build(bn_momentum=1.5)


# --------------------------------------------------------- 12. slide inference: MMSeg's formula


def test_slide_inference_averages_logits_then_softmax_as_mmsegmentation():
    kernel = 3.0 * jax.random.normal(jax.random.key(0), (3, 3, 3, 4))

    def apply_fn(x):  # zero padding makes each window's logits depend on where it was cut
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    image = jax.random.normal(jax.random.key(1), (1, 16, 24, 3))
    predict = functools.partial(inference.predict_probs, apply_fn, window=16, overlap=0.5)
    probs = jax.jit(predict)(image)
    # Two windows: columns 0–15 and 8–23 (stride 8), overlapping on columns 8–15.
    image_np = np.asarray(image, np.float64)
    preds, count = np.zeros((1, 16, 24, 4)), np.zeros((1, 16, 24, 1))
    window_probs = np.zeros((1, 16, 24, 4))
    for left in (0, 8):
        logits = np.asarray(apply_fn(image[:, :, left : left + 16]), np.float64)
        preds[:, :, left : left + 16] += logits
        window_probs[:, :, left : left + 16] += np.exp(logits) / np.exp(logits).sum(
            -1, keepdims=True
        )
        count[:, :, left : left + 16] += 1
    assert image_np.shape[2] == 24 and count.max() == 2
    mean = preds / count
    mmseg = np.exp(mean) / np.exp(mean).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, mmseg, atol=1e-5)
    # The probability average differs in the overlap; window_average='probs' gives it.
    assert np.abs(window_probs / count - mmseg).max() > 1e-2
    probs_average = jax.jit(functools.partial(predict, window_average="probs"))(image)
    np.testing.assert_allclose(probs_average, window_probs / count, atol=1e-5)
    with pytest.raises(ValueError, match="window_average must be one of 'logits', 'probs'"):
        inference.predict_probs(apply_fn, image, window=16, window_average="mean")


# ------------------------------------------------------------------------ 13. initialisation


def _std(kernel):
    return float(np.std(np.asarray(kernel, np.float64)))


def test_unet_kernels_start_with_std_sqrt_2_over_fan_in():
    model = models.create_model("unet", num_classes=3, base_channels=16)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    # enc1/conv1: 3×3, 16 -> 32 channels; fan-in 144 (std 0.118), fan-out 288 (0.083).
    kernel = params["enc1"]["conv1"]["conv"]["kernel"]
    assert kernel.shape == (3, 3, 16, 32)
    assert _std(kernel) == pytest.approx(np.sqrt(2 / (9 * 16)), rel=0.05)
    kernel = params["dec0"]["conv1"]["conv"]["kernel"]  # 3×3, 32 -> 16 (concatenated input)
    assert _std(kernel) == pytest.approx(np.sqrt(2 / (9 * 32)), rel=0.05)


def _depthwise_kernels(params):
    flat = traverse_util.flatten_dict(params)
    return [v for path, v in flat.items() if path[-1] == "kernel" and v.shape[2] == 1]


@pytest.mark.parametrize(
    "module",
    [
        EfficientNet("efficientnet_b0", width_multiplier=0.5),
        MobileNetV2(width_multiplier=0.5),
        layers.SeparableConv(8),
    ],
    ids=["efficientnet", "mobilenet_v2", "separable_conv"],
)
def test_depthwise_kernels_use_timms_fan_out_over_groups(module):
    channels = 256 if isinstance(module, layers.SeparableConv) else 3
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, channels)))["params"]
    kernels = _depthwise_kernels(params)
    assert kernels
    # timm: fan_out = k·k·out_channels // groups = k·k for a depthwise conv (multiplier 1).
    normalised = np.concatenate(
        [np.ravel(k) / np.sqrt(2.0 / (k.shape[0] * k.shape[1])) for k in kernels]
    )
    assert normalised.size > 2000
    assert float(np.std(normalised)) == pytest.approx(1.0, rel=0.05)
