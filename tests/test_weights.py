"""flaxseg.weights: parity with torchvision/timm after conversion, file reading, errors, and
loading pretrained backbones."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from model_helpers import random_variables
from parity_helpers import assert_close, images, import_torchvision, nhwc, randomise_batchnorm

from flaxseg import models, weights
from flaxseg.models.backbones.resnet import ResNet, torchvision_resnet_key_map
from flaxseg.models.backbones.xception import timm_xception65_key_map

import_torchvision()  # CUDA wheel on CPU torch: stub its op registrations first
import timm  # noqa: E402
import torchvision  # noqa: E402

SIZE = (97, 131)  # odd on purpose: every stride-2 step rounds


def _torch_param_count(module, skip_prefix=None):
    return sum(
        p.numel()
        for name, p in module.named_parameters()
        if skip_prefix is None or not name.startswith(skip_prefix)
    )


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_matches_torchvision(depth):
    torch.manual_seed(depth)
    reference = randomise_batchnorm(getattr(torchvision.models, f"resnet{depth}")())
    model, variables = weights.convert_torchvision(f"resnet{depth}", reference.state_dict())
    assert models.count_params(variables) == _torch_param_count(reference, "fc.")
    x = images(SIZE)
    features = jax.jit(model.apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        h = torch.from_numpy(x).permute(0, 3, 1, 2)
        h = reference.maxpool(reference.relu(reference.bn1(reference.conv1(h))))
        for stride, layer in zip(
            (4, 8, 16, 32), (reference.layer1, reference.layer2, reference.layer3, reference.layer4)
        ):
            h = layer(h)
            assert_close(features[stride], nhwc(h), f"resnet{depth} stride {stride}")


def test_alexnet_converts_from_torchvision():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in torchvision.models.alexnet().state_dict().items()}
    state = {k: np.full(shape, 0.5, np.float32) for k, shape in shapes.items()}
    model, variables = weights.convert_torchvision("alexnet", state)
    assert model.pooling == "floor" and models.count_params(variables) == sum(
        np.prod(shape) for key, shape in shapes.items() if key.startswith("features.")
    )


def test_vgg16_matches_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.vgg16().eval()
    model, variables = weights.convert_torchvision("vgg16", reference.state_dict())
    assert models.count_params(variables) == _torch_param_count(reference, "classifier.")
    x = images(SIZE, 1)
    features = jax.jit(model.apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        pool5 = reference.features(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert_close(features[32], nhwc(pool5), "vgg16 pool5")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_segmentation_model_matches_torchvision(arch):
    torch.manual_seed(1)
    builder = getattr(torchvision.models.segmentation, arch)
    reference = randomise_batchnorm(
        builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    )
    model, variables = weights.convert_torchvision(arch, reference.state_dict())
    assert model.aux_head and model.num_classes == 21
    assert models.count_params(variables) == _torch_param_count(reference)
    x = images(SIZE, 2)
    logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["aux"]))(
        variables, jnp.asarray(x)
    )
    with torch.no_grad():
        out = reference(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert_close(logits, nhwc(out["out"]), f"{arch} out")
    (aux,) = jax.tree.leaves(state["aux"])
    assert_close(aux, nhwc(out["aux"]), f"{arch} aux")


@pytest.mark.slow
def test_xception65_matches_timm():
    torch.manual_seed(2)
    reference = randomise_batchnorm(
        timm.create_model("xception65", num_classes=0, output_stride=16)
    )
    model, variables = weights.convert_timm("xception65", reference.state_dict())
    assert models.count_params(variables) == _torch_param_count(reference) == 37_867_312
    x = images(SIZE, 3)
    # Converted at the default output stride 32; the same variables serve stride 16.
    features = jax.jit(model.clone(output_stride=16).apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        out = reference.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert_close(features[32], nhwc(out), "xception65 output stride 16")


@pytest.mark.parametrize("arch", ["deeplabv3_resnet101", "fcn_resnet101"])
def test_resnet101_segmentation_parameter_counts_match_torchvision(arch):
    with torch.device("meta"):
        reference = getattr(torchvision.models.segmentation, arch)(
            weights=None, weights_backbone=None, num_classes=21, aux_loss=True
        )
    family = "deeplabv3" if arch.startswith("deeplabv3") else "fcn_resnet"
    kwargs = {"head": "torchvision"} if family == "deeplabv3" else {}
    model = models.create_model(
        family, num_classes=21, backbone="resnet101", aux_head=True, **kwargs
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert models.count_params(shapes) == _torch_param_count(reference)


def test_segmentation_checkpoint_without_aux_head_builds_model_without_it():
    with torch.device("meta"):
        reference = torchvision.models.segmentation.fcn_resnet50(
            weights=None, weights_backbone=None, num_classes=3, aux_loss=False
        )
    state = {k: np.zeros(v.shape, np.float32) for k, v in reference.state_dict().items()}
    model, variables = weights.convert_torchvision("fcn_resnet50", state)
    assert not model.aux_head and model.num_classes == 3
    assert "aux_head" not in variables["params"]
    assert models.count_params(variables) == _torch_param_count(reference)
    # A classifier entry torchvision's model does not have is an error for a segmentation arch
    # (only a backbone's ImageNet checkpoint may carry a classifier that is dropped).
    state["classifier.5.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(weights.WeightsError, match="1 unexpected keys: classifier.5.weight"):
        weights.convert_torchvision("fcn_resnet50", state)


# ----------------------------------------------------------------------------- errors


def _zeros_state(module):
    return {k: np.zeros(v.shape, np.float32) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def resnet50_state():
    with torch.device("meta"):
        return _zeros_state(torchvision.models.resnet50())


def test_unknown_arch_is_one_clear_error(resnet50_state):
    with pytest.raises(weights.WeightsError, match="Unknown torchvision arch 'resnet26'.*resnet50"):
        weights.convert_torchvision("resnet26", resnet50_state)
    with pytest.raises(weights.WeightsError, match="Unknown timm arch 'xception41'"):
        weights.convert_timm("xception41", resnet50_state)


def test_wrong_architecture_lists_missing_keys(resnet50_state):
    with pytest.raises(weights.WeightsError) as err:
        weights.convert_torchvision("resnet101", resnet50_state)
    message = str(err.value)
    assert "looks like 'resnet50'" in message and "torchvision's 'resnet101'" in message
    # layer3 has 6 units in ResNet-50, 23 in ResNet-101: 17 units × 15 tensors are missing.
    assert "255 missing keys" in message and "layer3.6.bn1.bias" in message
    assert "unexpected" not in message


@pytest.mark.parametrize(
    "builder,expected",
    [
        (lambda: torchvision.models.resnet34(), "resnet34"),
        (lambda: torchvision.models.resnet152(), "resnet152"),
        (lambda: torchvision.models.vgg16_bn(), "vgg16_bn"),
        (lambda: torchvision.models.vgg16(), "vgg16"),
        (lambda: torchvision.models.alexnet(), "alexnet"),
        (
            lambda: torchvision.models.segmentation.deeplabv3_resnet101(
                weights=None, weights_backbone=None
            ),
            "deeplabv3_resnet101",
        ),
        (
            lambda: torchvision.models.segmentation.fcn_resnet50(
                weights=None, weights_backbone=None
            ),
            "fcn_resnet50",
        ),
        (lambda: timm.create_model("xception65"), "xception65"),
        (lambda: torch.nn.Linear(2, 2), None),
    ],
)
def test_detect_architecture(builder, expected):
    with torch.device("meta"):
        state = builder().state_dict()
    assert weights.detect_architecture(state) == expected


def test_segmentation_arch_given_a_backbone_checkpoint(resnet50_state):
    with pytest.raises(
        weights.WeightsError,
        match="not a torchvision 'deeplabv3_resnet50' checkpoint; it looks like 'resnet50'",
    ):
        weights.convert_torchvision("deeplabv3_resnet50", resnet50_state)


def test_unexpected_and_misshaped_keys_are_listed_together(resnet50_state):
    state = dict(resnet50_state)
    state["layer1.0.conv2.weight"] = np.zeros((64, 64, 5, 5), np.float32)
    state["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
    del state["layer4.2.bn3.running_var"]
    with pytest.raises(weights.WeightsError) as err:
        weights.convert_torchvision("resnet50", state)
    message = str(err.value)
    assert "1 missing keys: layer4.2.bn3.running_var" in message
    assert "1 unexpected keys: layer5.0.conv1.weight" in message
    assert "1 keys of the wrong shape: layer1.0.conv2.weight (64, 64, 5, 5)" in message
    assert "(needs (3, 3, 64, 64) for params/layer1_0/conv2/kernel)" in message


def test_vgg_checkpoint_for_resnet_is_refused():
    with torch.device("meta"):
        state = _zeros_state(torchvision.models.vgg16().features)
    state = {f"features.{k}": v for k, v in state.items()}
    # ResNet-50 has 53 convs and 53 BNs (4 tensors each): 265 tensors; VGG16 has 26.
    with pytest.raises(
        weights.WeightsError,
        match="looks like 'vgg16'.*265 missing keys: conv1.weight.*26 unexpected keys: features.0",
    ):
        weights.convert_torchvision("resnet50", state)


# ----------------------------------------------------------------------------- files


def _small_state():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "bn.running_var": rng.uniform(size=(4,)).astype(np.float32),
    }


def test_pth_and_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    state = _small_state()
    torch.save(
        {"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}},
        tmp_path / "w.pth",
    )
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded = weights.load_state_dict(tmp_path / name)
        assert sorted(loaded) == sorted(state)  # wrapper and 'module.' prefix removed
        for key in state:
            assert isinstance(loaded[key], np.ndarray)
            np.testing.assert_array_equal(loaded[key], state[key])


def test_safetensors_loads_without_torch(tmp_path):
    from safetensors.numpy import save_file

    save_file(_small_state(), str(tmp_path / "w.safetensors"))
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from flaxseg import weights\n"
        f"state = weights.load_state_dict({str(tmp_path / 'w.safetensors')!r})\n"
        "print(sorted(state), state['conv.weight'].shape)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "['bn.running_var', 'conv.weight'] (4, 3, 3, 3)" in result.stdout


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_truncated_file_is_one_clear_error(tmp_path, name):
    from safetensors.numpy import save_file

    path = tmp_path / name
    state = _small_state()
    if name.endswith(".pth"):
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    else:
        save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightsError, match=f"Could not read {path}.*truncated"):
        weights.load_state_dict(path)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.load_state_dict(tmp_path / "nope.pth")
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.convert_torchvision("resnet50", str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------- backbones


@pytest.mark.slow
def test_load_pretrained_backbone_from_torchvision_imagenet_file(tmp_path):
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in torchvision.models.resnet50().state_dict().items()}
    path = tmp_path / "resnet50.safetensors"
    save_file(state, str(path))
    model = models.create_model("deeplabv3plus", num_classes=21, backbone="resnet50")
    variables = random_variables(model)

    loaded, report = weights.load_pretrained_backbone(variables, path, model)
    key_map = torchvision_resnet_key_map(50)
    flat = traverse_util.flatten_dict(loaded)
    for (collection, *rest), key in key_map.items():
        value = np.asarray(flat[(collection, "backbone", *rest)])
        expected = state[key].transpose(2, 3, 1, 0) if state[key].ndim == 4 else state[key]
        np.testing.assert_array_equal(value, expected)
    assert report.source == "resnet50" and len(report.loaded) == len(key_map)
    assert report.unused == ("fc.bias", "fc.weight")
    assert report.random and not any(name.startswith("backbone/") for name in report.random)
    assert {name.split("/")[0] for name in report.random} == {
        "aspp",
        "low_level_project",
        "decoder_0",
        "decoder_1",
        "classifier",
    }
    old, new = traverse_util.flatten_dict(variables), flat
    for path_, value in old.items():  # the head is untouched
        if path_[1] != "backbone":
            np.testing.assert_array_equal(np.asarray(new[path_]), value)
    assert "stayed random" in str(report) and "aspp" in str(report) and "fc.weight" in str(report)


def _torch_file(path, flax_variables, key_map, extra=None):
    """Write what a PyTorch user's file holds for ``flax_variables`` along ``key_map``."""
    flat = traverse_util.flatten_dict(flax_variables)
    state = {
        key: np.asarray(flat[p]).transpose(3, 2, 0, 1)
        if np.ndim(flat[p]) == 4
        else np.asarray(flat[p])
        for p, key in key_map.items()
    }
    state.update(extra or {})
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return state


@pytest.mark.slow
def test_deep_stem_keeps_a_random_stem_with_a_torchvision_file(tmp_path):
    # PSPNet's ResNet has the deep stem; a torchvision file has the 7×7 one.
    tiny = ResNet(depth=50, base_width=4)
    source = random_variables(tiny, seed=1)
    _torch_file(
        tmp_path / "tiny.pth",
        source,
        torchvision_resnet_key_map(50),
        {"fc.weight": np.zeros((10, 128), np.float32)},
    )
    model = models.create_model(
        "pspnet", num_classes=3, backbone="resnet50", base_width=4, head_channels=8, aux_channels=8
    )
    variables = random_variables(model, seed=2)
    loaded, report = weights.load_pretrained_backbone(variables, tmp_path / "tiny.pth", model)
    assert report.source == "resnet50"
    random_backbone = {
        "/".join(name.split("/")[:2]) for name in report.random if name.startswith("backbone/")
    }
    assert random_backbone == {f"backbone/stem_{i}" for i in (0, 1, 3, 4, 6, 7)}
    assert report.unused == (
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.weight",
        "conv1.weight",
        "fc.weight",
    )
    np.testing.assert_array_equal(
        loaded["params"]["backbone"]["layer4_2"]["conv3"]["kernel"],
        source["params"]["layer4_2"]["conv3"]["kernel"],
    )
    np.testing.assert_array_equal(
        loaded["params"]["backbone"]["stem_0"]["kernel"],
        variables["params"]["backbone"]["stem_0"]["kernel"],
    )


@pytest.mark.slow
def test_load_pretrained_xception_backbone_from_timm_keys(tmp_path):
    from safetensors.numpy import save_file

    tiny = dict(
        backbone="xception65",
        base_width=4,
        num_middle_units=16,
        aspp_channels=8,
        low_level_channels=4,
        decoder_channels=8,
    )
    model = models.create_model("deeplabv3plus", num_classes=3, **tiny)
    source = random_variables(model, seed=3)
    flat_source = traverse_util.flatten_dict(source)
    state = {"head.fc.weight": np.zeros((1000, 128), np.float32)}
    for (collection, *rest), key in timm_xception65_key_map().items():
        value = np.asarray(flat_source[(collection, "backbone", *rest)])
        # safetensors writes the raw buffer: hand it C-contiguous arrays.
        state[key] = np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value)
    save_file(state, str(tmp_path / "x.safetensors"))
    loaded, report = weights.load_pretrained_backbone(
        random_variables(model, seed=4), tmp_path / "x.safetensors", model
    )
    assert report.source == "xception65" and report.unused == ("head.fc.weight",)
    np.testing.assert_array_equal(
        loaded["params"]["backbone"]["blocks_10"]["stack_conv2"]["conv_dw"]["kernel"],
        source["params"]["backbone"]["blocks_10"]["stack_conv2"]["conv_dw"]["kernel"],
    )


def test_load_pretrained_backbone_refuses_another_architecture(tmp_path):
    with torch.device("meta"):
        shapes = torchvision.models.vgg16().features.state_dict()
    state = {f"features.{k}": torch.zeros(v.shape) for k, v in list(shapes.items())[:4]}
    path = tmp_path / "vgg_part.pth"
    torch.save(state, path)
    model = models.create_model(
        "deeplabv3", num_classes=3, backbone="resnet50", base_width=4, aspp_channels=8
    )
    with pytest.raises(
        weights.WeightsError,
        match=r"vgg_part.pth \(vgg16\) does not fit the model's resnet50 backbone: "
        r"\d+ missing keys: layer1.0",
    ):
        weights.load_pretrained_backbone(random_variables(model), path, model)


def _tiny_vgg_state(base, fc):
    cfg = []
    for depth, mult in zip((2, 2, 3, 3, 3), (1, 2, 4, 8, 8)):
        cfg += [base * mult] * depth + ["M"]
    torch.manual_seed(0)
    state = {
        f"features.{k}": v for k, v in torchvision.models.vgg.make_layers(cfg).state_dict().items()
    }
    for index, layer in (
        (0, torch.nn.Linear(8 * base * 49, fc)),
        (3, torch.nn.Linear(fc, fc)),
        (6, torch.nn.Linear(fc, 10)),
    ):
        state.update({f"classifier.{index}.{k}": v for k, v in layer.state_dict().items()})
    return state


def test_vgg_classifier_is_decimated_into_deeplabv1_fc6_fc7(tmp_path):
    state = _tiny_vgg_state(base=4, fc=64)
    torch.save(state, tmp_path / "vgg.pth")
    model = models.create_model("deeplabv1", num_classes=3, base_width=4, fc_channels=16)
    loaded, report = weights.load_pretrained_backbone(
        random_variables(model), tmp_path / "vgg.pth", model
    )
    # DeepLab-LargeFOV: 4096×7×7 -> 1024×3×3 by decimation; here 64 -> 16 channels (every 4th)
    # and taps 0, 3, 6 of the 7×7 window.
    w6 = state["classifier.0.weight"].numpy().reshape(64, 32, 7, 7)[::4][:, :, ::3, ::3]
    np.testing.assert_array_equal(loaded["params"]["fc6"]["kernel"], w6.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        loaded["params"]["fc6"]["bias"], state["classifier.0.bias"].numpy()[::4]
    )
    np.testing.assert_array_equal(
        loaded["params"]["fc7"]["kernel"][0, 0], state["classifier.3.weight"].numpy()[::4, ::4].T
    )
    assert {name.split("/")[0] for name in report.random} == {"fc8"}
    assert report.unused == ("classifier.6.bias", "classifier.6.weight")


def test_vgg_classifier_folds_exactly_into_fcn_fc6_fc7(tmp_path):
    state = _tiny_vgg_state(base=4, fc=16)
    torch.save(state, tmp_path / "vgg.pth")
    model = models.create_model("fcn8s", num_classes=3, base_width=4, fc_channels=16)
    variables = random_variables(model)
    loaded, report = weights.load_pretrained_backbone(variables, tmp_path / "vgg.pth", model)
    # The strict converter's exact fold of the same file is the reference.
    reference = weights.convert_state_dict(
        state,
        model.pretrained_backbone().key_map(),
        variables,
        ignore_classifier=True,
        complete=False,
    )
    for name in ("fc6", "fc7"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(
                loaded["params"][name][leaf], reference["params"][name][leaf]
            )
    assert "fc6/kernel" not in report.random and "backbone/features_0/kernel" not in report.random


# Every model with a pretrainable backbone, at full size, with a file of the matching
# architecture: (model, kwargs, how to build the PyTorch network on the meta device).
_ROUND_TRIPS = {
    "deeplabv1": ({}, lambda: torchvision.models.vgg16()),
    "deeplabv2": ({"backbone": "resnet152"}, lambda: torchvision.models.resnet152()),
    "deeplabv3": ({"backbone": "resnet50"}, lambda: torchvision.models.resnet50()),
    "deeplabv3plus": ({"backbone": "xception65"}, lambda: timm.create_model("xception65")),
    "fcn8s": ({"backbone": "vgg16_bn"}, lambda: torchvision.models.vgg16_bn()),
    "fcn16s": ({}, lambda: torchvision.models.vgg16()),
    "fcn32s": ({"backbone": "alexnet"}, lambda: torchvision.models.alexnet()),
    "fcn_resnet": ({"backbone": "resnet101"}, lambda: torchvision.models.resnet101()),
    # MMSegmentation's ResNetV1c: torchvision's layers behind the deep stem.
    "pspnet": ({"backbone": "resnet50"}, lambda: _resnet50_v1c()),
    "refinenet": ({"backbone": "resnet50"}, lambda: torchvision.models.resnet50()),
    "segnet": ({}, lambda: torchvision.models.vgg16_bn()),
    "unet": ({"backbone": "resnet50"}, lambda: torchvision.models.resnet50()),
}


def _resnet50_v1c():
    net = torchvision.models.resnet50()
    del net.conv1, net.bn1
    net.stem = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 2, 1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, 1, 1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, 1, 1, bias=False),
        torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(),
    )
    return net


def test_every_model_with_a_backbone_is_tested_for_a_round_trip():
    with_backbone = {
        name
        for name in models.list_models()
        if models.create_model(name, num_classes=2).pretrained_backbone()
    }
    assert with_backbone | {"unet"} == set(_ROUND_TRIPS)  # U-Net: with a ResNet encoder


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_ROUND_TRIPS))
def test_pretrained_backbone_round_trips_a_pytorch_file(tmp_path, name):
    # A random state dict of the PyTorch twin (without the large fc6 classifier, whose folding
    # and decimation the tiny tests above check) lands in the model's backbone exactly; the
    # model is only traced (eval_shape), never run.
    from safetensors.numpy import save_file

    kwargs, build = _ROUND_TRIPS[name]
    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape)
            for k, v in build().state_dict().items()
            if not k.startswith("classifier.")
        }
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(shape, dtype=np.float32) for k, shape in shapes.items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    model = models.create_model(name, num_classes=3, **kwargs)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    loaded, report = weights.load_pretrained_backbone(variables, tmp_path / "w.safetensors", model)
    spec = model.pretrained_backbone()
    flat = traverse_util.flatten_dict(loaded)
    backbone_paths = {p for p in flat if p[1 : 1 + len(spec.path)] == spec.path}
    assert backbone_paths and {tuple(p.split("/")) for p in report.loaded} == backbone_paths
    for path, key in spec.key_map().items():
        if path in backbone_paths:
            value = state[key].transpose(2, 3, 1, 0) if state[key].ndim == 4 else state[key]
            np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=key)
    assert not any(
        k.startswith(("layer", "blocks.", "features.", "stem.")) for k in report.unused
    ), report.unused
