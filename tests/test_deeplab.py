"""DeepLab v1/v2/v3/v3+ and FCN-ResNet: shapes at odd sizes and output strides 8/16, the
papers' structure at full size (traced, not computed), atrous rates as wired, image pooling at
batch size 1, output stride switched at evaluation, multi-scale fusion, and bad arguments."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import images as _images
from helpers import tiny_model
from model_helpers import random_variables
from parity_helpers import flat_shapes, import_torchvision

from flaxseg import models, weights
from flaxseg.models import layers
from flaxseg.models.backbones.vgg import (
    VGG16,
    VGG16_BLOCK_DEPTHS,
    VGG16_WIDTH_MULTIPLIERS,
    torchvision_vgg16_key_map,
)
from flaxseg.models.heads import ASPP, ImagePooling

import_torchvision()  # CUDA wheel on CPU torch: stub its op registrations first
import torch  # noqa: E402
import torchvision  # noqa: E402

pytestmark = pytest.mark.slow  # compiles every DeepLab for parity with PyTorch

NUM_CLASSES = 5
# Tiny variants covering every code path: (registry name, kwargs).
CASES = {
    "deeplabv1": ("deeplabv1", dict(base_width=4, fc_channels=16)),
    "deeplabv2": ("deeplabv2", dict(backbone="resnet50", base_width=4)),
    "deeplabv2_msc": (
        "deeplabv2",
        dict(backbone="resnet50", base_width=4, input_scales=(1.0, 0.75, 0.5)),
    ),
    "deeplabv3": ("deeplabv3", dict(backbone="resnet50", base_width=4, aspp_channels=8)),
    "deeplabv3_torchvision": (
        "deeplabv3",
        dict(backbone="resnet50", base_width=4, aspp_channels=8, head="torchvision", aux_head=True),
    ),
    "deeplabv3plus": (
        "deeplabv3plus",
        dict(
            backbone="resnet50",
            base_width=4,
            aspp_channels=8,
            low_level_channels=4,
            decoder_channels=8,
        ),
    ),
    "deeplabv3plus_xception": (
        "deeplabv3plus",
        dict(
            backbone="xception65",
            base_width=4,
            num_middle_units=2,
            aspp_channels=8,
            low_level_channels=4,
            decoder_channels=8,
        ),
    ),
    "fcn_resnet": ("fcn_resnet", dict(backbone="resnet50", base_width=4, aux_head=True)),
}
AUX_ENTRIES = {"deeplabv2_msc": 3, "deeplabv3_torchvision": 1, "fcn_resnet": 1}


def _tiny(case, **kwargs):
    name, tiny = CASES[case]
    return tiny_model(name, NUM_CLASSES, tiny, **kwargs)


def _shapes(model, height=64, width=64):
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, height, width, 3)),
    )
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("output_stride,batch,height,width", [(8, 2, 37, 53), (16, 1, 67, 45)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_have_input_size_at_odd_sizes(case, output_stride, batch, height, width):
    model = _tiny(case, output_stride=output_stride)
    variables = _shapes(model)
    images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    expected = (batch, height, width, NUM_CLASSES)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
    assert (logits.shape, logits.dtype) == (expected, jnp.float32)
    logits, state = jax.eval_shape(
        functools.partial(model.apply, train=True, mutable=["batch_stats", layers.AUX_COLLECTION]),
        variables,
        images,
        rngs={"dropout": jax.random.key(0)},
    )
    assert (logits.shape, logits.dtype) == (expected, jnp.float32)
    aux = jax.tree.leaves(state.get(layers.AUX_COLLECTION, {}))
    assert len(aux) == AUX_ENTRIES.get(case, 0)
    assert all((a.shape, a.dtype) == (expected, jnp.float32) for a in aux)


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_stride_changes_no_parameter_shape(case):
    shapes = [flat_shapes(_shapes(_tiny(case, output_stride=s)), sep="/") for s in (8, 16)]
    assert shapes[0] == shapes[1]


# ----------------------------------------------------------------------------- full-size structure


def _full_size_params(name, **kwargs):
    model = models.create_model(name, num_classes=21, **kwargs)
    return flat_shapes(_shapes(model)["params"], sep="/")


def test_deeplabv3_head_is_the_papers():
    params = _full_size_params("deeplabv3", backbone="resnet101")
    head = {k: v for k, v in params.items() if not k.startswith("backbone/")}
    assert head == {
        # ASPP: 1×1, three 3×3 atrous, image pooling (each 256 + BN), 1×1 projection + BN.
        "aspp/convs_0/conv/kernel": (1, 1, 2048, 256),
        **{f"aspp/convs_{i}/conv/kernel": (3, 3, 2048, 256) for i in (1, 2, 3)},
        "aspp/convs_4/pool/conv/kernel": (1, 1, 2048, 256),
        "aspp/project/conv/kernel": (1, 1, 5 * 256, 256),
        **{
            f"aspp/{m}/bn/{p}": (256,)
            for m in ("convs_0", "convs_1", "convs_2", "convs_3", "convs_4/pool", "project")
            for p in ("scale", "bias")
        },
        "classifier/kernel": (1, 1, 256, 21),
        "classifier/bias": (21,),
    }


def test_deeplabv3plus_decoder_is_the_papers():
    params = _full_size_params("deeplabv3plus", backbone="resnet101")
    assert params["low_level_project/conv/kernel"] == (1, 1, 256, 48)
    assert params["decoder_0/conv/kernel"] == (3, 3, 256 + 48, 256)
    assert params["decoder_1/conv/kernel"] == (3, 3, 256, 256)
    assert params["classifier/kernel"] == (1, 1, 256, 21)
    assert params["aspp/convs_1/conv/kernel"] == (3, 3, 2048, 256)


def test_deeplabv3plus_xception_uses_separable_aspp_and_decoder():
    params = _full_size_params("deeplabv3plus", backbone="xception65")
    assert params["aspp/convs_1/conv_dw/kernel"] == (3, 3, 1, 2048)
    assert params["aspp/convs_1/conv_pw/kernel"] == (1, 1, 2048, 256)
    assert params["aspp/convs_0/conv/kernel"] == (1, 1, 2048, 256)  # 1×1 branch stays plain
    assert params["low_level_project/conv/kernel"] == (1, 1, 256, 48)
    assert params["decoder_0/conv_dw/kernel"] == (3, 3, 1, 304)
    assert params["decoder_0/conv_pw/kernel"] == (1, 1, 304, 256)
    assert params["decoder_1/conv_dw/kernel"] == (3, 3, 1, 256)
    assert (
        len(
            [
                k
                for k in params
                if k.startswith("backbone/blocks_") and k.endswith("stack_conv1/conv_dw/kernel")
            ]
        )
        == 3 + 16 + 2
    )


def test_deeplabv1_head_is_largefov():
    params = _full_size_params("deeplabv1")
    head = {k: v for k, v in params.items() if not k.startswith("backbone/")}
    assert head == {
        "fc6/kernel": (3, 3, 512, 1024),
        "fc6/bias": (1024,),
        "fc7/kernel": (1, 1, 1024, 1024),
        "fc7/bias": (1024,),
        "fc8/kernel": (1, 1, 1024, 21),
        "fc8/bias": (21,),
    }
    assert len([k for k in params if k.startswith("backbone/")]) == 2 * 13


def test_deeplabv2_head_is_aspp_l():
    params = _full_size_params("deeplabv2", backbone="resnet101")
    head = {k: v for k, v in params.items() if not k.startswith("backbone/")}
    assert head == {
        **{f"aspp/branches_{i}/kernel": (3, 3, 2048, 21) for i in range(4)},
        **{f"aspp/branches_{i}/bias": (21,) for i in range(4)},
    }


# ----------------------------------------------------------------------------- rates as wired


def _conv_dilations(model, **apply_kwargs):
    """{module path: kernel dilation} of every conv that runs in ``model.apply``."""
    dilations = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Conv) and context.method_name == "__call__":
            dilation = module.kernel_dilation
            dilations["/".join(module.scope.path)] = (
                dilation if isinstance(dilation, int) else dilation[0]
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(
            functools.partial(model.apply, **apply_kwargs),
            _shapes(model),
            jnp.zeros((1, 65, 65, 3)),
        )
    return dilations


@pytest.mark.parametrize(
    "case,kwargs,aspp,layer4",
    [
        ("deeplabv3", dict(output_stride=16), (6, 12, 18), (2, 4, 8)),
        ("deeplabv3", dict(output_stride=8), (12, 24, 36), (4, 8, 16)),
        ("deeplabv3_torchvision", {}, (12, 24, 36), (2, 4, 4)),
        ("deeplabv3plus", {}, (6, 12, 18), (2, 4, 8)),
    ],
)
def test_aspp_rates_and_multi_grid_as_in_the_papers(case, kwargs, aspp, layer4):
    dilations = _conv_dilations(_tiny(case, **kwargs))
    assert tuple(dilations[f"aspp/convs_{i}/conv"] for i in (1, 2, 3)) == aspp
    assert tuple(dilations[f"backbone/layer4_{i}/conv2"] for i in range(3)) == layer4


def test_output_stride_given_at_apply_rewires_rates():
    model = _tiny("deeplabv3", output_stride=16)
    dilations = _conv_dilations(model, output_stride=8)
    assert tuple(dilations[f"aspp/convs_{i}/conv"] for i in (1, 2, 3)) == (12, 24, 36)


def test_deeplabv1_rates():
    dilations = _conv_dilations(_tiny("deeplabv1"))
    assert dilations["fc6"] == 12
    assert [dilations[f"backbone/features_{i}"] for i in (21, 24, 26, 28)] == [1, 2, 2, 2]
    dilations = _conv_dilations(_tiny("deeplabv1", output_stride=16))
    assert dilations["fc6"] == 6
    assert [dilations[f"backbone/features_{i}"] for i in (21, 24, 26, 28)] == [1, 1, 1, 1]


def test_deeplabv1_floor_pooling_vgg_matches_torchvision_with_the_surgery():
    # pooling='floor': torchvision's VGG16 features with the DeepLab v1 surgery done by hand:
    # pool4/pool5 3×3 stride 1 pad 1, conv5 dilation 2.
    base = 4
    cfg = []
    for depth, mult in zip(VGG16_BLOCK_DEPTHS, VGG16_WIDTH_MULTIPLIERS):
        cfg += [base * mult] * depth + ["M"]
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(cfg).eval()
    for index in (23, 30):
        features[index] = torch.nn.MaxPool2d(3, 1, 1)
    for index in (24, 26, 28):
        features[index].dilation, features[index].padding = (2, 2), (2, 2)
    module = VGG16(base_width=base, output_stride=8)
    state = {f"features.{k}": v.numpy() for k, v in features.state_dict().items()}
    flat = {
        path: (state[key].transpose(2, 3, 1, 0) if state[key].ndim == 4 else state[key])
        for path, key in torchvision_vgg16_key_map(False).items()
    }
    x = np.random.default_rng(0).normal(size=(1, 45, 59, 3)).astype(np.float32)
    ours = jax.jit(module.apply)(traverse_util.unflatten_dict(flat), jnp.asarray(x))
    with torch.no_grad():
        theirs = features(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert ours[32].shape == theirs.shape == (1, 5, 7, 8 * base)  # floor(45 / 8), floor(59 / 8)
    assert np.abs(np.asarray(ours[32]) - theirs).max() <= 1e-5 * np.abs(theirs).max()


def _largefov_prototxt_net(base, fc, num_classes):
    """DeepLab-LargeFOV written layer by layer from its released train.prototxt (deeplab-public,
    voc12/config/DeepLab-LargeFOV), widths scaled by base / 64. Caffe pools round up; its AVE
    pooling divides by the window clipped to the padded extent, which is PyTorch's
    count_include_pad=True (and with ceil_mode=True the same clipping of an overhang)."""
    nn_, layers_, c_in = torch.nn, [], 3
    for block, (depth, mult) in enumerate(zip(VGG16_BLOCK_DEPTHS, VGG16_WIDTH_MULTIPLIERS)):
        rate = 2 if block == 4 else 1  # conv5_*: dilation 2, pad 2
        for _ in range(depth):
            layers_ += [nn_.Conv2d(c_in, base * mult, 3, padding=rate, dilation=rate), nn_.ReLU()]
            c_in = base * mult
        # pool1-pool3: MAX 3 stride 2 pad 1; pool4, pool5: MAX 3 stride 1 pad 1.
        layers_.append(nn_.MaxPool2d(3, 2 if block < 3 else 1, 1, ceil_mode=True))
    layers_.append(nn_.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True))  # pool5a
    layers_ += [
        nn_.Conv2d(c_in, fc, 3, padding=12, dilation=12),
        nn_.ReLU(),
        nn_.Dropout(0.5),
        nn_.Conv2d(fc, fc, 1),
        nn_.ReLU(),
        nn_.Dropout(0.5),
        nn_.Conv2d(fc, num_classes, 1),
    ]
    return nn_.Sequential(*layers_).eval()


def test_deeplabv1_matches_the_largefov_prototxt():
    torch.manual_seed(0)
    net = _largefov_prototxt_net(4, 16, NUM_CLASSES)
    with torch.no_grad():
        for layer in net:  # activations of order 1 through all 16 layers
            if isinstance(layer, torch.nn.Conv2d):
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0, (2 / fan_in) ** 0.5)
                layer.bias.normal_(0, 0.1)
    # The prototxt's VGG layers sit at torchvision's `features` indices; fc6/fc7/fc8 follow.
    state = {
        (
            f"features.{k}"
            if int(k.split(".")[0]) < 31
            else f"{['fc6', 'fc7', 'fc8'][[32, 35, 38].index(int(k.split('.')[0]))]}."
            f"{k.split('.')[1]}"
        ): v
        for k, v in net.state_dict().items()
    }
    model = _tiny("deeplabv1")
    key_map = layers.prefix_key_map(torchvision_vgg16_key_map(False), ("backbone",))
    for name in ("fc6", "fc7", "fc8"):
        key_map.update(layers.conv_key_map((name,), name, bias=True))
    variables = weights.convert_state_dict(state, key_map, _shapes(model))
    apply = jax.jit(model.apply)
    for height, width, score_size in [(33, 47, (5, 7)), (65, 65, (9, 9))]:
        x = np.random.default_rng(height).normal(size=(1, height, width, 3)).astype(np.float32)
        with torch.no_grad():
            scores = net(torch.from_numpy(x).permute(0, 3, 1, 2))
            expected = torch.nn.functional.interpolate(
                scores, (height, width), mode="bilinear", align_corners=False
            )
        assert tuple(scores.shape[2:]) == score_size  # Caffe rounds up: 47 -> 24 -> 13 -> 7
        expected = expected.permute(0, 2, 3, 1).numpy()
        error = np.abs(np.asarray(apply(variables, jnp.asarray(x))) - expected).max()
        assert error <= 1e-4 * max(1.0, np.abs(expected).max()), (height, width, error)


def _msc_train_stats(model, variables, images):
    return jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats", "aux"]))(
        variables, images
    )


def test_deeplabv2_multi_scale_updates_batchnorm_statistics_once_per_step():
    msc, single = _tiny("deeplabv2_msc"), _tiny("deeplabv2")
    variables = random_variables(single)
    images = _images(2, 41, 49)
    (_, msc_state), (single_logits, single_state) = (
        _msc_train_stats(msc, variables, images),
        _msc_train_stats(single, variables, images),
    )
    before = traverse_util.flatten_dict(variables["batch_stats"])
    after = traverse_util.flatten_dict(msc_state["batch_stats"])
    reference = traverse_util.flatten_dict(single_state["batch_stats"])
    assert set(after) == set(reference) == set(before)
    for path in before:  # moved, and exactly as far as by the full-scale pass alone
        assert not np.allclose(after[path], before[path]), path
        np.testing.assert_allclose(after[path], reference[path], rtol=1e-5, atol=1e-6)
    # The full scale is the single-scale network; the other scales still use batch statistics.
    np.testing.assert_allclose(msc_state["aux"]["scale_100"], single_logits, rtol=1e-5, atol=1e-5)


def test_deeplabv2_frozen_batchnorm_uses_and_keeps_the_running_statistics():
    model = _tiny("deeplabv2_msc", frozen_batchnorm=True)
    variables = random_variables(model)
    images = _images(2, 41, 49)
    train_logits, state = _msc_train_stats(model, variables, images)
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
    # No dropout in DeepLab v2: with frozen statistics training computes what evaluation does.
    np.testing.assert_allclose(
        train_logits, jax.jit(model.apply)(variables, images), rtol=1e-6, atol=1e-6
    )
    unfrozen_logits, _ = _msc_train_stats(_tiny("deeplabv2_msc"), variables, images)
    assert not np.allclose(unfrozen_logits, train_logits, atol=1e-3)


def test_deeplabv2_and_xception_rates():
    dilations = _conv_dilations(_tiny("deeplabv2"))
    assert tuple(dilations[f"aspp/branches_{i}"] for i in range(4)) == (6, 12, 18, 24)
    dilations = _conv_dilations(_tiny("deeplabv3plus_xception", output_stride=8))
    assert tuple(dilations[f"aspp/convs_{i}/conv_dw"] for i in (1, 2, 3)) == (12, 24, 36)


# ----------------------------------------------------------------------------- computed


def test_image_pooling_trains_at_batch_size_one():
    # PyTorch's ASPP raises here ("Expected more than 1 value per channel when training");
    # naive batch statistics would zero the branch and corrupt its running variance.
    aspp = ASPP(4, (1, 2, 3), dropout_rate=0.0)
    x = _images(1, 7, 9)
    variables = random_variables(aspp, x)

    def loss_fn(params):
        y, state = aspp.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(y**2), (y, state)

    grads, (y, state) = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])
    assert np.isfinite(np.asarray(y)).all()
    pool_grad = grads["convs_4"]["pool"]
    assert np.abs(np.asarray(pool_grad["conv"]["kernel"])).max() > 0
    assert np.abs(np.asarray(pool_grad["bn"]["scale"])).max() > 0
    before, after = variables["batch_stats"], state["batch_stats"]
    np.testing.assert_array_equal(
        after["convs_4"]["pool"]["bn"]["var"], before["convs_4"]["pool"]["bn"]["var"]
    )
    assert not np.allclose(after["convs_0"]["bn"]["var"], before["convs_0"]["bn"]["var"])
    # The pooled branch alone is normalised exactly as at evaluation.
    pooling = ImagePooling(4)
    pool_variables = {c: v["convs_4"] for c, v in variables.items()}
    np.testing.assert_allclose(
        np.asarray(pooling.apply(pool_variables, x, train=True, mutable=["batch_stats"])[0]),
        np.asarray(pooling.apply(pool_variables, x, train=False)),
        rtol=1e-6,
    )


def test_image_pooling_uses_batch_statistics_from_batch_size_two():
    aspp = ASPP(4, (1, 2, 3), dropout_rate=0.0)
    x = _images(2, 7, 9)
    variables = random_variables(aspp, x)
    _, state = jax.jit(functools.partial(aspp.apply, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    new = state["batch_stats"]["convs_4"]["pool"]["bn"]["var"]
    assert not np.allclose(new, variables["batch_stats"]["convs_4"]["pool"]["bn"]["var"])


def test_deeplabv3_trains_at_batch_size_one():
    model = _tiny("deeplabv3")
    logits, state = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        random_variables(model), _images(1, 41, 49), rngs={"dropout": jax.random.key(0)}
    )
    assert logits.shape == (1, 41, 49, NUM_CLASSES) and np.isfinite(np.asarray(logits)).all()
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state))


def test_output_stride_switches_at_evaluation_with_the_same_variables():
    model = _tiny("deeplabv3", output_stride=16)
    variables = random_variables(model)
    images = _images(2, 45, 51)
    at_16 = jax.jit(model.apply)(variables, images)
    at_8 = jax.jit(functools.partial(model.apply, output_stride=8))(variables, images)
    rebuilt = jax.jit(_tiny("deeplabv3", output_stride=8).apply)(variables, images)
    assert at_8.shape == at_16.shape == (2, 45, 51, NUM_CLASSES)
    assert np.isfinite(np.asarray(at_8)).all()
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(at_8), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(at_8), np.asarray(at_16), atol=1e-3)


def test_deeplabv2_multi_scale_fuses_by_max_and_sows_each_scale():
    model = _tiny("deeplabv2_msc")
    variables = random_variables(model)
    images = _images(1, 49, 57)
    logits, state = jax.jit(functools.partial(model.apply, mutable=[layers.AUX_COLLECTION]))(
        variables, images
    )
    aux = state[layers.AUX_COLLECTION]
    assert sorted(aux) == ["scale_100", "scale_50", "scale_75"]
    full = np.asarray(aux["scale_100"])
    # The max is taken at the full-scale score resolution and bilinear upsampling has
    # non-negative weights, so the fused logits dominate the full-scale ones everywhere ...
    assert (np.asarray(logits) >= full - 1e-5).all()
    # ... and the smaller scales do win somewhere.
    assert (np.asarray(logits) > full + 1e-3).any()
    single = _tiny("deeplabv2")
    np.testing.assert_allclose(
        np.asarray(jax.jit(single.apply)(variables, images)), full, rtol=1e-5, atol=1e-5
    )


def test_deeplabv3plus_xception_computes_finite_logits():
    model = _tiny("deeplabv3plus_xception", output_stride=8)
    logits = jax.jit(model.apply)(random_variables(model), _images(1, 39, 45))
    assert logits.shape == (1, 39, 45, NUM_CLASSES) and np.isfinite(np.asarray(logits)).all()
    assert float(jnp.std(logits)) > 0


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "name", ["deeplabv1", "deeplabv2", "deeplabv3", "deeplabv3plus", "fcn_resnet"]
)
def test_bad_output_stride_is_one_clear_error(name):
    with pytest.raises(ValueError, match="output_stride must be one of 8, 16, 32, got 12"):
        models.create_model(name, num_classes=21, output_stride=12)


def test_bad_output_stride_at_apply_is_one_clear_error():
    model = _tiny("deeplabv3")
    with pytest.raises(ValueError, match="output_stride must be one of 8, 16, 32, got 4"):
        jax.eval_shape(
            functools.partial(model.apply, output_stride=4),
            _shapes(model),
            jnp.zeros((1, 33, 33, 3)),
        )


_RESNETS = "'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d'"


@pytest.mark.parametrize(
    "name,valid",
    [
        ("deeplabv1", "'vgg16', 'vgg16_bn'"),
        ("deeplabv2", _RESNETS + ", 'xception65'"),
        ("deeplabv3", _RESNETS + ", 'xception65'"),
        ("deeplabv3plus", _RESNETS + ", 'xception65'"),
        ("fcn_resnet", _RESNETS),
    ],
)
def test_unknown_backbone_lists_valid_ones(name, valid):
    with pytest.raises(
        ValueError, match=f"Unknown backbone 'vgg19' for .*; valid backbones: {valid}\\."
    ):
        models.create_model(name, num_classes=21, backbone="vgg19")


def test_other_bad_arguments():
    with pytest.raises(
        ValueError, match="Unknown DeepLab v3 head 'mmseg'; valid heads: 'paper', 'torchvision'"
    ):
        models.create_model("deeplabv3", num_classes=21, head="mmseg")
    with pytest.raises(ValueError, match="input_scales must start with 1.0"):
        models.create_model("deeplabv2", num_classes=21, input_scales=(0.5, 1.0))
    with pytest.raises(ValueError, match="num_classes must be at least 1, got 0"):
        models.create_model("deeplabv3plus", num_classes=0)
