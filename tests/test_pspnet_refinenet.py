"""PSPNet and RefineNet: geometry at odd sizes, train mode and aux logits, parameter counts
against torchvision ResNets plus head arithmetic, and PyTorch parity of their special blocks."""

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import images as _images
from helpers import tiny_model
from model_helpers import check_train_mode, random_variables

from flaxseg import models
from flaxseg.models import pspnet, refinenet

pytestmark = pytest.mark.slow  # compiles PSPNet and RefineNet for parity with PyTorch

NUM_CLASSES = 3


def _torchvision():
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision

    return torchvision


_tiny = functools.partial(tiny_model, num_classes=NUM_CLASSES)


def _conv(c_in, c_out, k=3, bias=False, bn=False):
    return k * k * c_in * c_out + (c_out if bias else 0) + (2 * c_out if bn else 0)


def _torchvision_resnet_without_fc(depth):
    tv = _torchvision()
    net = getattr(tv.models, f"resnet{depth}")()
    return sum(p.numel() for name, p in net.named_parameters() if not name.startswith("fc."))


def _to_torch(x):
    return torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy())


def _from_torch(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------- shared checks


@pytest.mark.parametrize("name", ["pspnet", "refinenet"])
def test_logits_at_input_size_for_odd_sizes(name):
    model = _tiny(name)
    variables = random_variables(model, jnp.zeros((1, 35, 47, 3)))
    apply = jax.jit(model.apply)
    for height, width in [(35, 47), (9, 5)]:
        logits = apply(variables, _images(2, height, width))
        assert logits.shape == (2, height, width, NUM_CLASSES)
        assert logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all() and float(jnp.std(logits)) > 0


@pytest.mark.parametrize("name", ["pspnet", "refinenet"])
def test_train_mode_batch_stats_dropout_and_aux_logits(name):
    model = _tiny(name)
    images = _images(2, 33, 41)
    variables = random_variables(model, images)
    first, updates = check_train_mode(model, variables, images, NUM_CLASSES)

    aux = updates.get("aux", {})
    if name == "pspnet":
        # One entry, at the input's size, float32, from the layer3 head; only in training.
        assert list(aux) == ["layer3"]
        assert aux["layer3"].shape == (2, 33, 41, NUM_CLASSES)
        assert aux["layer3"].dtype == jnp.float32
        assert not np.allclose(aux["layer3"], first)
        _, eval_state = jax.jit(functools.partial(model.apply, mutable=["aux"]))(variables, images)
        assert not eval_state.get("aux")
    else:
        assert not aux


def test_pspnet_aux_head_can_be_left_out():
    with_aux = jax.eval_shape(_tiny("pspnet").init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
    model = _tiny("pspnet", aux_head=False)
    without = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
    assert "aux_head" in with_aux["params"] and "aux_head" not in without["params"]
    _, state = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats", "aux"], rngs={"dropout": jax.random.key(0)}
        ),
        without,
        jnp.zeros((1, 33, 33, 3)),
    )
    assert not state.get("aux")


def test_bad_arguments_raise_one_clear_error():
    with pytest.raises(ValueError, match="output_stride must be one of 8, 16, 32, got 4"):
        models.create_model("pspnet", num_classes=21, output_stride=4)
    with pytest.raises(ValueError, match="'resnet50', 'resnet101', 'resnet152'"):
        models.create_model("pspnet", num_classes=21, backbone="xception65")
    with pytest.raises(ValueError, match="'resnet50', 'resnet101', 'resnet152'"):
        models.create_model("refinenet", num_classes=21, backbone="vgg16")


# ----------------------------------------------------------------------------- parameter counts


def test_pspnet_resnet50_parameter_count():
    backbone = _torchvision_resnet_without_fc(50)
    # Deep stem (3×3 convs 3→32→32→64, each + BN) instead of the 7×7 conv 3→64 + BN.
    backbone += (
        _conv(3, 32, bn=True)
        + _conv(32, 32, bn=True)
        + _conv(32, 64, bn=True)
        - _conv(3, 64, k=7, bn=True)
    )
    ppm = 4 * _conv(2048, 512, k=1, bn=True)
    head = _conv(4096, 512, bn=True) + _conv(512, 21, k=1, bias=True)
    aux = _conv(1024, 256, bn=True) + _conv(256, 21, k=1, bias=True)
    model = models.create_model("pspnet", num_classes=21, backbone="resnet50")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 65, 65, 3)))
    assert models.count_params(shapes) == backbone + ppm + head + aux


def test_refinenet_resnet101_parameter_count():
    backbone = _torchvision_resnet_without_fc(101)

    def rcu(c):  # the first conv of an RCU has a bias, the second none (reference code)
        return _conv(c, c, bias=True) + _conv(c, c)

    def crp(c):
        return 4 * _conv(c, c)

    dimred = _conv(2048, 512) + _conv(1024, 256) + _conv(512, 256) + _conv(256, 256)
    refinenet4 = 2 * rcu(512) + crp(512) + rcu(512)
    refinenet3 = (
        2 * rcu(256) + 2 * rcu(512) + _conv(256, 256) + _conv(512, 256) + crp(256) + rcu(256)
    )
    refinenet2_1 = 2 * (4 * rcu(256) + 2 * _conv(256, 256) + crp(256) + rcu(256))
    head = 2 * rcu(256) + _conv(256, 21, bias=True)
    model = models.create_model("refinenet", num_classes=21, backbone="resnet101")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 65, 65, 3)))
    assert models.count_params(shapes) == (
        backbone + dimred + refinenet4 + refinenet3 + refinenet2_1 + head
    )


# ----------------------------------------------------------------------------- block parity


def test_pyramid_pooling_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 13, 11, 16)).astype(np.float32)
    module = pspnet.PyramidPooling()
    variables = random_variables(module, jnp.asarray(x))
    for stats in variables["batch_stats"].values():  # non-trivial running statistics
        stats["bn"]["mean"] = rng.standard_normal(4).astype(np.float32)
        stats["bn"]["var"] = rng.uniform(0.5, 2, 4).astype(np.float32)
    out = module.apply(variables, jnp.asarray(x))

    t_x, branches = _to_torch(x), [_to_torch(x)]
    for b in (1, 2, 3, 6):
        params, stats = variables["params"][f"bin{b}"], variables["batch_stats"][f"bin{b}"]
        y = F.adaptive_avg_pool2d(t_x, b)
        kernel = np.asarray(params["conv"]["kernel"]).transpose(3, 2, 0, 1)
        y = F.conv2d(y, torch.from_numpy(kernel.copy()))
        y = F.batch_norm(
            y,
            torch.from_numpy(np.asarray(stats["bn"]["mean"])),
            torch.from_numpy(np.asarray(stats["bn"]["var"])),
            torch.from_numpy(np.asarray(params["bn"]["scale"])),
            torch.from_numpy(np.asarray(params["bn"]["bias"])),
            eps=1e-5,
        )
        y = F.interpolate(F.relu(y), size=(13, 11), mode="bilinear", align_corners=False)
        branches.append(y)
    expected = _from_torch(torch.cat(branches, dim=1))
    assert out.shape == (2, 13, 11, 32)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_chained_residual_pooling_matches_torch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 9, 12, 4)).astype(np.float32)
    module = refinenet.ChainedResidualPooling()
    variables = random_variables(module, jnp.asarray(x))
    out = module.apply(variables, jnp.asarray(x))

    t_sum = t_path = _to_torch(x)
    for stage in range(4):
        kernel = np.asarray(variables["params"][f"conv{stage + 1}"]["kernel"])
        t_path = F.max_pool2d(t_path, 5, stride=1, padding=2)
        t_path = F.conv2d(t_path, torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), padding=1)
        t_sum = t_sum + t_path
    np.testing.assert_allclose(np.asarray(out), _from_torch(t_sum), atol=1e-5)
