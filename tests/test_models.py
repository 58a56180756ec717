"""Model registry, every registered model at tiny width, FCN geometry and parameter counts,
backbones against torchvision."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
from flax import traverse_util
from helpers import images as _images
from helpers import tiny_model
from model_helpers import random_variables
from parity_helpers import flat_shapes, hwio, import_torchvision, init_shapes

from flaxseg import models, weights
from flaxseg.models import backbones, fcn, layers
from flaxseg.models.backbones.vgg import VGG16_BLOCK_DEPTHS, VGG16_WIDTH_MULTIPLIERS

torchvision = import_torchvision()

NUM_CLASSES = 5
# Tiny settings for every registered model (tests/tiny_models.py);
# a model added to the registry must have an entry.
TINY_KWARGS = tiny_models.TINY_KWARGS
FCN_NAMES = ["fcn16s", "fcn32s", "fcn8s"]


_tiny = functools.partial(tiny_model, num_classes=NUM_CLASSES)


def _jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


# ----------------------------------------------------------------------------- registry


def test_list_models_is_sorted_and_has_the_fcn_family():
    names = models.list_models()
    assert names == sorted(names)
    assert {"fcn8s", "fcn16s", "fcn32s"} <= set(names)


def test_every_registered_model_has_tiny_test_settings():
    assert set(models.list_models()) == set(TINY_KWARGS)


def test_the_registry_docstring_lists_every_model():
    assert str(models.list_models()) in " ".join(models.__doc__.replace("#", " ").split())


def test_every_resnet_depth_is_accepted_wherever_resnet_is():
    takes_resnet = []
    for name in models.list_models():
        try:
            models.create_model(name, num_classes=2, backbone="resnet50")
        except ValueError:
            continue
        takes_resnet.append(name)
        for backbone in backbones.RESNETS:
            assert models.create_model(name, num_classes=2, backbone=backbone).backbone == backbone
    assert set(takes_resnet) == {
        "deeplabv2",
        "deeplabv3",
        "deeplabv3plus",
        "fcn_resnet",
        "pspnet",
        "refinenet",
        "unet",
    }


@pytest.mark.parametrize("name", models.list_models())
def test_pretrained_backbone_key_map_names_model_variables(name):
    # The contract flaxseg.weights.load_pretrained_backbone relies on: every path of the key
    # map is a variable of the model (shapes are checked by the loading tests).
    model = _tiny(name)
    spec = model.pretrained_backbone()
    if spec is None:
        assert (name, model.backbone) == ("unet", "unet")
        return
    flat = traverse_util.flatten_dict(init_shapes(model))
    key_map = spec.key_map()
    assert key_map and set(key_map) <= set(flat)
    backbone_paths = {
        p
        for p in flat
        if p[1 : 1 + len(spec.path)] == spec.path and p[0] in ("params", "batch_stats")
    }
    assert backbone_paths <= set(key_map)


def test_create_model_unknown_name_lists_available_models():
    with pytest.raises(ValueError, match="Unknown model 'fcn4s'") as err:
        models.create_model("fcn4s", num_classes=21)
    for name in models.list_models():
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["fcn8s", "fcn16s"])
def test_fcn_unknown_backbone_lists_valid_ones(name):
    with pytest.raises(ValueError, match="'vgg16', 'vgg16_bn'") as err:
        models.create_model(name, num_classes=21, backbone="resnet50")
    assert "'resnet50'" in str(err.value) and "alexnet" not in str(err.value)


def test_fcn32s_unknown_backbone_lists_alexnet_too():
    with pytest.raises(ValueError, match="'vgg16', 'vgg16_bn', 'alexnet'"):
        models.create_model("fcn32s", num_classes=21, backbone="vgg19")


@pytest.mark.parametrize("name", ["fcn8s", "fcn16s"])
def test_alexnet_is_refused_for_skip_fcns(name):
    with pytest.raises(ValueError, match="'alexnet' is only available for FCN-32s"):
        models.create_model(name, num_classes=21, backbone="alexnet")


def test_create_model_passes_settings_through():
    model = models.create_model(
        "fcn16s", num_classes=7, backbone="vgg16_bn", dtype=jnp.bfloat16, fc_channels=32
    )
    assert (
        model.num_classes,
        model.prediction_stride,
        model.backbone,
        model.dtype,
        model.fc_channels,
    ) == (7, 16, "vgg16_bn", jnp.bfloat16, 32)


def test_count_params_accepts_variables_shapes_and_bare_params():
    model = _tiny("fcn32s")
    shapes = init_shapes(model)
    variables = random_variables(model)
    expected = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    assert expected > 0 and "batch_stats" not in variables
    assert models.count_params(variables) == models.count_params(shapes) == expected
    assert models.count_params(variables["params"]) == expected


# ----------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", models.list_models())
def test_every_registered_model_meets_the_shape_and_dtype_contract(name):
    # Shapes and dtypes only (tracing, no compilation), so that walking the whole registry stays
    # cheap; each architecture's own tests compute with it.
    model, model_bf16 = _tiny(name), _tiny(name, dtype=jnp.bfloat16)
    variables = init_shapes(model_bf16)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}

    def check(logits, batch, height, width):
        assert (logits.shape, logits.dtype) == ((batch, height, width, NUM_CLASSES), jnp.float32)

    for height, width in [(35, 47), (67, 93)]:
        images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
        check(
            jax.eval_shape(functools.partial(model.apply, train=False), variables, images),
            1,
            height,
            width,
        )
    images = jax.ShapeDtypeStruct((2, 35, 47, 3), jnp.float32)
    check(
        jax.eval_shape(functools.partial(model_bf16.apply, train=False), variables, images),
        2,
        35,
        47,
    )
    train_apply = functools.partial(
        model.apply, train=True, mutable=["batch_stats", layers.AUX_COLLECTION]
    )
    logits, state = jax.eval_shape(
        train_apply, variables, images, rngs={"dropout": jax.random.key(0)}
    )
    check(logits, 2, 35, 47)
    for aux in jax.tree.leaves(state.get(layers.AUX_COLLECTION, {})):
        assert (aux.shape[:3], aux.dtype) == ((2, 35, 47), jnp.float32)


@pytest.mark.parametrize("name", FCN_NAMES)
def test_fcn_logits_are_finite_and_generic_at_odd_sizes(name):
    model = _tiny(name)
    variables, apply = random_variables(model), _jit_apply(model)
    for height, width in [(35, 47), (67, 93)]:
        logits = apply(variables, _images(2, height, width), train=False)
        assert logits.shape == (2, height, width, NUM_CLASSES)
        assert logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all()
        assert float(jnp.std(logits)) > 0


@pytest.mark.parametrize("name", FCN_NAMES)
def test_fcn_train_mode_applies_dropout(name):
    model = _tiny(name)
    variables, apply = random_variables(model), _jit_apply(model)
    images = _images(2, 35, 47)

    def train_apply(seed):
        logits, _ = apply(
            variables,
            images,
            train=True,
            mutable=("batch_stats",),
            rngs={"dropout": jax.random.key(seed)},
        )
        return np.asarray(logits)

    first, second = train_apply(1), train_apply(2)
    assert first.shape == (2, 35, 47, NUM_CLASSES)
    assert np.isfinite(first).all()
    assert not np.allclose(first, second)  # the dropout rng matters
    assert not np.allclose(first, np.asarray(apply(variables, images, train=False)))


@pytest.mark.parametrize("name", FCN_NAMES)
def test_fcn_bfloat16_compute_gives_finite_float32_logits_close_to_float32(name):
    model = _tiny(name, dtype=jnp.bfloat16)
    variables = random_variables(model)
    logits = _jit_apply(model)(variables, _images(1, 35, 47), train=False)
    assert logits.dtype == jnp.float32 and logits.shape == (1, 35, 47, NUM_CLASSES)
    assert np.isfinite(np.asarray(logits)).all()
    reference = _jit_apply(_tiny(name))(variables, _images(1, 35, 47), train=False)
    # bfloat16 really is the compute dtype: close to, but not bit-equal with, float32.
    assert not np.array_equal(np.asarray(logits), np.asarray(reference))
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(reference), atol=0.1 * float(jnp.abs(reference).max())
    )


# ----------------------------------------------------------------------------- FCN specifics


def test_fcn8s_init_is_faithful():
    model = _tiny("fcn8s")
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
    )
    params = variables["params"]
    assert set(variables) == {"params"}
    assert set(params) == {
        "backbone",
        "fc6",
        "fc7",
        "score_fr",
        "upscore2",
        "score_pool4",
        "upscore_pool4",
        "score_pool3",
        "upscore8",
    }
    assert params["fc6"]["kernel"].shape == (7, 7, 32, 16)
    for name in ("score_fr", "score_pool4", "score_pool3"):  # zero-initialised, as in Caffe
        assert not np.asarray(params[name]["kernel"]).any()
    for name, k in (("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)):
        assert set(params[name]) == {"kernel"}  # no bias
        np.testing.assert_array_equal(
            params[name]["kernel"], layers.bilinear_kernel(k, NUM_CLASSES)
        )
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def _skip_score_inputs(model, variables, images):
    """(logits, {score layer: its input}) of the skip score layers of an FCN."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name in (
            "score_pool4",
            "score_pool3",
        ):
            seen[context.module.name] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        logits = model.apply(variables, images)
    return np.asarray(logits), seen


@pytest.mark.parametrize(
    "name,factors",
    [("fcn16s", {"score_pool4": 0.01}), ("fcn8s", {"score_pool4": 0.01, "score_pool3": 1e-4})],
)
def test_fcn_at_once_scales_the_skips_with_the_staged_parameters(name, factors):
    # voc-fcn8s-atonce: pool4 × 0.01 and pool3 × 0.0001 before their score layers.
    staged, at_once = _tiny(name), _tiny(name, at_once=True)
    assert flat_shapes(init_shapes(at_once)) == flat_shapes(init_shapes(staged))
    variables, images = random_variables(staged), _images(1, 35, 47)
    staged_logits, staged_inputs = _skip_score_inputs(staged, variables, images)
    at_once_logits, at_once_inputs = _skip_score_inputs(at_once, variables, images)
    assert sorted(at_once_inputs) == sorted(staged_inputs) == sorted(factors)
    for layer, factor in factors.items():
        assert np.abs(staged_inputs[layer]).max() > 0
        np.testing.assert_allclose(
            at_once_inputs[layer], factor * staged_inputs[layer], rtol=1e-6, atol=0
        )
    assert not np.allclose(at_once_logits, staged_logits)


def test_fcn_alexnet_logits_have_input_size():
    model = _tiny("fcn32s", backbone="alexnet")
    logits = _jit_apply(model)(random_variables(model), _images(1, 67, 93), train=False)
    assert logits.shape == (1, 67, 93, NUM_CLASSES) and logits.dtype == jnp.float32
    assert float(jnp.std(logits)) > 0


def test_fcn_vgg16_bn_trains_batch_stats():
    model = _tiny("fcn8s", backbone="vgg16_bn")
    variables = random_variables(model)
    _, updates = _jit_apply(model)(
        variables,
        _images(2, 35, 47),
        train=True,
        mutable=("batch_stats",),
        rngs={"dropout": jax.random.key(0)},
    )
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert len(after) == 2 * 13  # mean and var of the 13 BatchNorms
    assert all(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(
    "name,backbone",
    [("fcn32s", "vgg16"), ("fcn16s", "vgg16"), ("fcn8s", "vgg16"), ("fcn32s", "alexnet")],
)
def test_fcn_crops_give_input_size_for_every_size_modulo_32(name, backbone):
    # The crop geometry is separable and depends on a size only through its residue mod 32
    # (plus small-size effects), so heights 1..16 and widths 17..32 cover every case; shapes
    # only, nothing is computed.
    model = _tiny(name, backbone=backbone)
    variables = init_shapes(model)
    for height in range(1, 17):
        width = height + 16
        images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
        assert jax.eval_shape(model.apply, variables, images).shape == (
            1,
            height,
            width,
            NUM_CLASSES,
        )


@pytest.mark.parametrize("height,width", [(500, 375), (375, 500), (32, 32), (97, 131)])
def test_full_size_fcn8s_shape(height, width):
    model = models.create_model("fcn8s", num_classes=21)
    images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    assert jax.eval_shape(model.apply, variables, images).shape == (1, height, width, 21)


def _coord_map(layers, scale=1.0, shift=0.0):
    """Compose Caffe's coord_map: a layer (k, s, p) maps its coordinate u to s·u + (k−1)/2 − p
    of its input; a transposed layer ('T', k, s, p) is the inverse. Returns x = scale·u + shift
    in input coordinates."""
    for layer in layers:
        if layer[0] == "T":
            _, k, s, p = layer
            scale, shift = scale / s, shift - scale / s * ((k - 1) / 2 - p)
        else:
            k, s, p = layer
            scale, shift = scale * s, shift + scale * ((k - 1) / 2 - p)
    return scale, shift


def test_fcn_crop_offsets_align_maps_as_caffe_coord_map_derives():
    conv, pool = (3, 1, 1), (2, 2, 0)
    to_pool3 = [(3, 1, 100), conv, pool, conv, conv, pool, conv, conv, conv, pool]
    to_pool4 = to_pool3 + [conv, conv, conv, pool]
    to_score = to_pool4 + [conv, conv, conv, pool, (7, 1, 0)]

    def offset(cropped, reference):
        """Where the reference map's origin lies in the cropped map."""
        layers_a, layers_reference = cropped, reference
        (scale_a, shift_a), (scale_r, shift_r) = _coord_map(layers_a), _coord_map(layers_reference)
        assert scale_a == scale_r
        return (shift_r - shift_a) / scale_a

    up2 = ("T", 4, 2, 0)
    (_, _, pool4_offset, *_), (_, _, pool3_offset, *_) = fcn._SKIPS
    assert offset(to_pool4, to_score + [up2]) == pool4_offset == 5
    assert offset(to_pool3, to_score + [up2, up2]) == pool3_offset == 9
    for stride, skips in ((32, []), (16, [up2]), (8, [up2, up2])):
        kernel, crop = fcn._FINAL_UPSAMPLING[("vgg", stride)]
        assert offset(to_score + skips + [("T", kernel, stride, 0)], []) == crop
    alexnet_score = [
        (11, 4, 100),
        (3, 2, 0),
        (5, 1, 2),
        (3, 2, 0),
        (3, 1, 1),
        (3, 1, 1),
        (3, 1, 1),
        (3, 2, 0),
        (6, 1, 0),
    ]
    kernel, crop = fcn._FINAL_UPSAMPLING[("alexnet", 32)]
    assert offset(alexnet_score + [("T", kernel, 32, 0)], []) == crop == 18


# ----------------------------------------------------------------------------- parameter counts


def _independent_fcn_param_count(prediction_stride, backbone="vgg16", num_classes=21):
    # Built from torch modules on the meta device (no memory), independent of flaxseg.
    nn_ = torch.nn
    with torch.device("meta"):
        if backbone == "alexnet":
            modules = [torchvision.models.alexnet().features, nn_.Conv2d(256, 4096, 6)]
            final_kernel = 63
        else:
            modules = [getattr(torchvision.models, backbone)().features, nn_.Conv2d(512, 4096, 7)]
            final_kernel = 2 * prediction_stride
        modules += [nn_.Conv2d(4096, 4096, 1), nn_.Conv2d(4096, num_classes, 1)]
        if prediction_stride <= 16:
            modules += [
                nn_.ConvTranspose2d(num_classes, num_classes, 4, 2, bias=False),
                nn_.Conv2d(512, num_classes, 1),
            ]
        if prediction_stride <= 8:
            modules += [
                nn_.ConvTranspose2d(num_classes, num_classes, 4, 2, bias=False),
                nn_.Conv2d(256, num_classes, 1),
            ]
        modules.append(
            nn_.ConvTranspose2d(
                num_classes, num_classes, final_kernel, prediction_stride, bias=False
            )
        )
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize(
    "name,stride,backbone",
    [
        ("fcn8s", 8, "vgg16"),
        ("fcn16s", 16, "vgg16"),
        ("fcn32s", 32, "vgg16"),
        ("fcn8s", 8, "vgg16_bn"),
        ("fcn32s", 32, "alexnet"),
    ],
)
def test_full_size_fcn_parameter_count(name, stride, backbone):
    model = models.create_model(name, num_classes=21, backbone=backbone)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert models.count_params(shapes) == _independent_fcn_param_count(stride, backbone)


def test_full_size_fcn8s_parameter_count_literal():
    # VGG16 convs 14,714,688 + fc6 102,764,544 + fc7 16,781,312 + score_fr 86,037
    # + score_pool4 10,773 + score_pool3 5,397 + upsampling 2·7,056 + 112,896.
    assert _independent_fcn_param_count(8) == 134_489_759


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("kind", ["vgg16", "vgg16_bn", "alexnet"])
def test_torchvision_key_map_covers_every_features_key_with_matching_shapes(kind):
    with torch.device("meta"):
        torch_state = getattr(torchvision.models, kind)().state_dict()
    expected = {
        k: tuple(v.shape)
        for k, v in torch_state.items()
        if k.startswith("features.") and not k.endswith("num_batches_tracked")
    }
    module, key_map = backbones.create(kind), backbones.key_map(kind)
    shapes = flat_shapes(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    assert sorted(key_map.values()) == sorted(expected)
    assert set(key_map) == set(shapes)
    for path, torch_key in key_map.items():
        assert shapes[path] == hwio(expected[torch_key]), (path, torch_key)


def _torch_features_by_stride(features, x_nchw, pool_strides):
    """Run a torchvision ``features`` Sequential, keeping each max-pool's output by stride and
    the activation before the first pool."""
    outputs, pools = {}, iter(pool_strides)
    with torch.no_grad():
        for layer in features:
            if isinstance(layer, torch.nn.MaxPool2d) and not outputs:
                outputs["before_first_pool"] = x_nchw
            x_nchw = layer(x_nchw)
            if isinstance(layer, torch.nn.MaxPool2d):
                outputs[next(pools)] = x_nchw
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in outputs.items()}


def _features_state(features):
    """State dict of a bare ``features`` Sequential, keyed as inside torchvision's model."""
    return {f"features.{k}": v for k, v in features.state_dict().items()}


def _randomise_bn_stats(features):
    with torch.no_grad():
        for layer in features:
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.normal_(0, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
                layer.weight.normal_(1, 0.1)
                layer.bias.normal_(0, 0.1)
    return features.eval()


def _tiny_vgg_cfg(base):
    cfg = []
    for depth, mult in zip(VGG16_BLOCK_DEPTHS, VGG16_WIDTH_MULTIPLIERS):
        cfg += [base * mult] * depth + ["M"]
    return cfg


def _convert(state, key_map, module, x, **kwargs):
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
    return weights.convert_state_dict(state, key_map, target, **kwargs)


@pytest.mark.parametrize(
    "kind,pooling", [("vgg16", "floor"), ("vgg16_bn", "floor"), ("vgg16", "ceil")]
)
def test_vgg16_matches_torchvision_features(kind, pooling):
    base, batchnorm = 4, kind == "vgg16_bn"
    torch.manual_seed(0)
    features = _randomise_bn_stats(
        torchvision.models.vgg.make_layers(_tiny_vgg_cfg(base), batch_norm=batchnorm)
    )
    fcn_geometry = pooling == "ceil"
    if fcn_geometry:  # the Caffe FCN variant: conv1_1 pads 100, pools round up
        features[0].padding = (100, 100)
        for layer in features:
            if isinstance(layer, torch.nn.MaxPool2d):
                layer.ceil_mode = True
    module = backbones.create(
        kind, base_width=base, pooling=pooling, first_conv_padding=100 if fcn_geometry else 1
    )
    x = np.random.default_rng(0).normal(size=(2, 45, 38, 3)).astype(np.float32)
    variables = _convert(_features_state(features), backbones.key_map(kind), module, x)
    ours = module.apply(variables, jnp.asarray(x), train=False)
    theirs = _torch_features_by_stride(
        features, torch.from_numpy(x).permute(0, 3, 1, 2), [2, 4, 8, 16, 32]
    )
    theirs[1] = theirs.pop("before_first_pool")
    assert sorted(ours) == sorted(theirs) == [1, 2, 4, 8, 16, 32]
    assert {s: v.shape[-1] for s, v in ours.items()} == module.out_channels
    for stride in ours:
        scale = np.abs(theirs[stride]).max()
        np.testing.assert_allclose(
            np.asarray(ours[stride]),
            theirs[stride],
            atol=1e-5 * max(scale, 1.0),
            err_msg=f"stride {stride}",
        )


def test_alexnet_matches_torchvision_features():
    torch.manual_seed(0)
    features = torchvision.models.alexnet().features.eval()
    module = backbones.create("alexnet")
    x = np.random.default_rng(1).normal(size=(1, 99, 111, 3)).astype(np.float32)
    variables = _convert(_features_state(features), backbones.key_map("alexnet"), module, x)
    ours = module.apply(variables, jnp.asarray(x))
    theirs = _torch_features_by_stride(
        features, torch.from_numpy(x).permute(0, 3, 1, 2), [8, 16, 32]
    )
    theirs[4] = theirs.pop("before_first_pool")
    assert sorted(ours) == sorted(theirs) == [4, 8, 16, 32]
    assert {s: v.shape[-1] for s, v in ours.items()} == module.out_channels
    for stride in ours:
        np.testing.assert_allclose(
            np.asarray(ours[stride]),
            theirs[stride],
            atol=1e-4,
            rtol=1e-4,
            err_msg=f"stride {stride}",
        )


def test_torchvision_classifier_folds_into_fcn_fc6_fc7():
    base, fc, c5 = 4, 16, 8 * 4
    torch.manual_seed(0)
    fc6, fc7 = torch.nn.Linear(c5 * 7 * 7, fc), torch.nn.Linear(fc, fc)
    state = _features_state(torchvision.models.vgg.make_layers(_tiny_vgg_cfg(base)))
    state.update({f"classifier.0.{k}": v for k, v in fc6.state_dict().items()})
    state.update({f"classifier.3.{k}": v for k, v in fc7.state_dict().items()})

    model = models.create_model("fcn8s", num_classes=NUM_CLASSES, base_width=base, fc_channels=fc)
    loaded = _convert(
        state,
        model.pretrained_backbone().key_map(),
        model,
        np.zeros((1, 32, 32, 3), np.float32),
        complete=False,
    )
    assert models.count_params(loaded) == sum(v.numel() for v in state.values())

    # fc6 as a 7×7 VALID conv on a 7×7 pool5 window == torchvision's Linear on the NCHW flatten.
    window = np.random.default_rng(0).normal(size=(1, 7, 7, c5)).astype(np.float32)
    ours = (
        jax.lax.conv_general_dilated(
            jnp.asarray(window),
            loaded["params"]["fc6"]["kernel"],
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )[0, 0, 0]
        + loaded["params"]["fc6"]["bias"]
    )
    with torch.no_grad():
        theirs = fc6(torch.from_numpy(window).permute(0, 3, 1, 2).flatten(1))[0].numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)


def test_state_dict_conversion_names_missing_and_mismatched_entries():
    module, key_map = backbones.create("alexnet", base_width=4), backbones.key_map("alexnet")
    x = np.zeros((1, 64, 64, 3), np.float32)
    with pytest.raises(weights.WeightsError, match="10 missing keys: features.0.weight"):
        _convert({}, key_map, module, x)
    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape) for k, v in torchvision.models.alexnet().features.state_dict().items()
        }
    state = {f"features.{k}": np.zeros(shape, np.float32) for k, shape in shapes.items()}
    with pytest.raises(
        weights.WeightsError,
        match=r"10 keys of the wrong shape: "
        r"features.0.weight \(64, 3, 11, 11\) "
        r"\(needs \(11, 11, 3, 4\)",
    ):
        _convert(state, key_map, module, x)
