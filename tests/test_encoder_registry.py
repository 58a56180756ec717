"""An encoder defined here, registered with one call, works like a built-in one: it trains
inside U-Net and DeepLab v3+ (smp head), converts from its PyTorch twin's state dict, is
recognised by its fingerprint and loads as a pretrained backbone; bad registrations and
encoders that cannot give what a model needs are one sentence each."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flaxseg import models, weights
from flaxseg.configs import default
from flaxseg.models import backbones
from flaxseg.models.layers import batchnorm_key_map, conv_key_map
from flaxseg.training import loop
from flaxseg.training.sharding import create_mesh, shard_batch

WIDTHS = (1, 2, 2, 4, 4)  # × base_width, at strides 2, 4, 8, 16, 32


class ToyEncoder(nn.Module):
    """Five 3×3 conv + BN + ReLU, each halving the map: features at strides 2…32. Below the
    output stride a conv keeps stride 1 and dilates by nominal stride / output stride (smp's
    ``make_dilated``), so no parameter shape depends on the output stride."""

    output_stride: int = 32
    base_width: int = 64
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        features = {}
        for index, multiplier in enumerate(WIDTHS):
            stride = 2 ** (index + 1)
            rate = max(1, stride // self.output_stride)
            x = nn.Conv(
                self.base_width * multiplier,
                (3, 3),
                strides=2 if rate == 1 else 1,
                padding=((rate, rate), (rate, rate)),
                kernel_dilation=rate,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{index}",
            )(x.astype(self.dtype))
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"bn{index}",
            )(x)
            features[stride] = x = nn.relu(x)
        return features


class TorchToy(torch.nn.Module):
    """ToyEncoder's PyTorch twin (NCHW)."""

    def __init__(self, base_width=4, in_channels=3):
        super().__init__()
        widths = [in_channels] + [base_width * m for m in WIDTHS]
        for index in range(len(WIDTHS)):
            conv = torch.nn.Conv2d(widths[index], widths[index + 1], 3, 2, 1, bias=False)
            setattr(self, f"conv{index}", conv)
            setattr(self, f"bn{index}", torch.nn.BatchNorm2d(widths[index + 1]))

    def forward(self, x):
        features = {}
        for index in range(len(WIDTHS)):
            x = getattr(self, f"bn{index}")(getattr(self, f"conv{index}")(x)).relu()
            features[2 ** (index + 1)] = x
        return features


def toy_key_map(**_):
    key_map = {}
    for index in range(len(WIDTHS)):
        key_map.update(conv_key_map((f"conv{index}",), f"conv{index}"))
        key_map.update(batchnorm_key_map((f"bn{index}",), f"bn{index}"))
    return key_map


def toy_fingerprint(state_dict):
    keys = set(state_dict)
    return (
        "toy"
        if {"conv0.weight", "bn4.running_var"} <= keys and "conv5.weight" not in keys
        else None
    )


TOY = backbones.Encoder(
    name="toy",
    build=ToyEncoder,
    channels=lambda base_width: {2 ** (i + 1): base_width * m for i, m in enumerate(WIDTHS)},
    dilation_styles=("smp",),
    key_maps={"pytorch": toy_key_map},
    fingerprint=toy_fingerprint,
)


@pytest.fixture(scope="module")
def toy():
    backbones.register(TOY)
    yield TOY
    backbones.unregister("toy")


def _torch_toy(base_width=4):
    torch.manual_seed(0)
    net = TorchToy(base_width).eval()
    with torch.no_grad():  # BatchNorm statistics off 0/1, so that they are checked too
        for index in range(len(WIDTHS)):
            bn = getattr(net, f"bn{index}")
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def _state(net):
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("unet", dict(base_channels=8)),
        (
            "deeplabv3plus",
            dict(
                head="smp", base_width=8, aspp_channels=8, low_level_channels=4, decoder_channels=8
            ),
        ),
    ],
)
def test_registered_toy_encoder_trains_inside_the_model(toy, name, kwargs):
    model = models.create_model(name, num_classes=3, backbone="toy", **kwargs)
    assert "toy" in model.valid_backbones()
    config = default.get_config()
    config.crop_size, config.batch_size, config.steps, config.lr = 32, 2, 2, 0.02
    config.num_classes, config.aux_loss_weight = 3, 0.4
    mesh = create_mesh()
    tx, _ = loop.create_optimizer(config)
    state = loop.init_state(model, tx, config, mesh)
    assert state.params["backbone"]["conv4"]["kernel"].shape == (3, 3, 32, 32)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((2, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 3, (2, 32, 32)).astype(np.int32),
    }
    batch = shard_batch(batch, mesh)
    train_step = loop.jit_train_step(config, mesh)
    first = jax.device_get(state.params["backbone"])
    for _ in range(2):
        state, metrics = train_step(state, batch, jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), first, jax.device_get(state.params["backbone"])
    )
    assert all(jax.tree.leaves(moved))  # the gradients reach every encoder parameter


def test_registered_toy_encoder_converts_from_its_torch_twin(toy, tmp_path):
    net = _torch_toy()
    state = _state(net)
    assert weights.detect_architecture(state) == "toy"
    module, variables = weights.convert_encoder("toy", state, base_width=4)
    assert isinstance(module, ToyEncoder) and module.base_width == 4
    x = np.random.default_rng(1).standard_normal((1, 37, 45, 3)).astype(np.float32)
    ours = module.apply(variables, x)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert set(ours) == set(theirs) == {2, 4, 8, 16, 32}
    for stride, feature in theirs.items():
        np.testing.assert_allclose(ours[stride], feature.numpy().transpose(0, 2, 3, 1), atol=1e-5)

    # As a model's pretrained backbone, from a file, with the RGB stem adapted to 1 channel.
    save_file(state, str(tmp_path / "toy.safetensors"))
    model = models.create_model(
        "unet", num_classes=2, backbone="toy", base_channels=4, in_channels=1
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    initial = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    initial.pop("aux", None)
    loaded, report = weights.load_pretrained_backbone(initial, tmp_path / "toy.safetensors", model)
    assert report.source == "toy" and report.adapted == ("backbone/conv0/kernel",)
    np.testing.assert_allclose(
        loaded["params"]["backbone"]["conv4"]["kernel"], variables["params"]["conv4"]["kernel"]
    )
    np.testing.assert_allclose(
        loaded["params"]["backbone"]["conv0"]["kernel"],
        variables["params"]["conv0"]["kernel"].sum(axis=2, keepdims=True),
        rtol=1e-6,
    )


def test_registering_twice_and_missing_strides_are_one_sentence(toy):
    with pytest.raises(ValueError, match=r"^Encoder 'toy' is already registered; .*\.$"):
        backbones.register(TOY)
    shallow = backbones.Encoder(
        name="toy_shallow",
        build=ToyEncoder,
        channels=lambda base_width: {4: base_width, 8: base_width, 16: base_width, 32: base_width},
        output_strides=(32,),
        key_maps={"pytorch": toy_key_map},
    )
    backbones.register(shallow)
    try:
        with pytest.raises(
            ValueError,
            match=r"^Encoder 'toy_shallow' cannot give stride 2, which U-Net needs; encoders that "
            r"can: 'resnet18', .*'toy'\.$",
        ):
            models.create_model("unet", num_classes=2, backbone="toy_shallow")
        with pytest.raises(
            ValueError,
            match=r"^Encoder 'toy_shallow' cannot give output stride 8, which DeepLab v3\+ needs; ",
        ):
            models.create_model("deeplabv3plus", num_classes=2, head="smp", backbone="toy_shallow")
        with pytest.raises(
            ValueError, match=r"^Encoder 'toy' takes no multi-grid, which DeepLab v3"
        ):
            models.create_model("deeplabv3", num_classes=2, backbone="toy")
    finally:
        backbones.unregister("toy_shallow")
    assert "toy_shallow" not in backbones.names()
