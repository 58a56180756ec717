"""segmentation_models_pytorch twins: U-Net with an encoder, ``head='smp'`` of DeepLab v3/v3+ and
PSPNet, and ``weights.convert_smp``.

Each parity test builds the smp model itself (random weights, ``encoder_weights=None``, eval
mode, every BatchNorm's statistics and affine moved away from 0/1), converts its whole state
dict with ``convert_smp`` and compares logits at 96×160, a size smp accepts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import random_variables
from parity_helpers import import_torchvision, relative_error

from flaxseg import models, weights
from flaxseg.models import backbones, heads

import_torchvision()  # CUDA wheel on CPU torch: stub its op registrations first
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.slow  # compiles full smp models for parity with PyTorch

NUM_CLASSES = 3
HEIGHT, WIDTH = 96, 160  # multiples of 32: every smp model accepts them
TOLERANCE = 1e-4  # max |flaxseg − smp| / max |smp|


def _smp_model(arch, encoder, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("classes", NUM_CLASSES)
    net = getattr(smp, arch)(encoder, encoder_weights=None, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    return net.eval()


def _images(height, width, channels, seed=0):
    return np.random.default_rng(seed).standard_normal((2, channels, height, width), np.float32)


def _smp_logits(net, images):
    with torch.no_grad():
        return net(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)


def _flax_logits(model, variables, images):
    return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images.transpose(0, 2, 3, 1))))


# (smp class, encoder, smp kwargs): the acceptance models, plus smp's DeepLabV3.
PARITY_CASES = [
    ("Unet", "resnet34", {"in_channels": 1}),
    ("Unet", "efficientnet-b0", {}),
    ("Unet", "mobilenet_v2", {}),
    ("DeepLabV3Plus", "efficientnet-b0", {}),
    ("DeepLabV3Plus", "resnet50", {}),
    ("PSPNet", "resnet34", {}),
    ("DeepLabV3", "resnet50", {}),
]


@pytest.mark.parametrize("arch, encoder, kwargs", PARITY_CASES)
def test_convert_smp_matches_smp_end_to_end(arch, encoder, kwargs):
    net = _smp_model(arch, encoder, **kwargs)
    model, variables = weights.convert_smp(arch, encoder, net.state_dict())
    assert model.num_classes == NUM_CLASSES
    assert model.in_channels == kwargs.get("in_channels", 3)
    images = _images(HEIGHT, WIDTH, model.in_channels)
    error = relative_error(_flax_logits(model, variables, images), _smp_logits(net, images))
    assert error <= TOLERANCE, error


def test_smp_unet_is_create_model_unet_with_an_encoder_and_matches_at_odd_sizes():
    # smp's U-Net sizes each upsampling by its skip, so it runs at any size; so does flaxseg's,
    # with PyTorch's 'nearest' indices (97 -> 49 -> 25 -> 13 -> 7 -> 4 and back).
    net = _smp_model("Unet", "resnet18", in_channels=1)
    model, variables = weights.convert_smp("unet", "resnet18", net.state_dict())
    assert model == models.create_model(
        "unet", backbone="resnet18", in_channels=1, num_classes=NUM_CLASSES
    )
    assert model.decoder_channels == (256, 128, 64, 32, 16) and model.use_batchnorm
    images = _images(97, 131, 1, seed=1)
    error = relative_error(_flax_logits(model, variables, images), _smp_logits(net, images))
    assert error <= TOLERANCE, error


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("DeepLabV3Plus", {"encoder_output_stride": 8, "decoder_atrous_rates": (6, 12, 18)}),
        ("DeepLabV3Plus", {"decoder_aspp_separable": False, "decoder_channels": 64}),
        ("DeepLabV3", {"encoder_output_stride": 16, "decoder_channels": 64}),
        ("Unet", {"decoder_use_norm": False, "decoder_channels": (64, 32, 16, 16, 8)}),
        ("PSPNet", {"encoder_depth": 4, "psp_out_channels": 64, "upsampling": 16}),
    ],
)
def test_convert_smp_follows_smp_keyword_arguments(arch, kwargs):
    # The smp arguments that change the network are passed on as convert_smp's smp_kwargs
    # (the output-size-only 'upsampling' is the resize to the input here).
    net = _smp_model(arch, "resnet18", **kwargs)
    model, variables = weights.convert_smp(arch, "resnet18", net.state_dict(), **kwargs)
    images = _images(HEIGHT, WIDTH, 3, seed=2)
    error = relative_error(_flax_logits(model, variables, images), _smp_logits(net, images))
    assert error <= TOLERANCE, error


def test_smp_models_run_at_odd_sizes_that_smp_refuses():
    # smp refuses 97×131 for the models with a fixed ×4/×8 upsampling; flaxseg resizes to the
    # skip's and the input's sizes instead and returns logits at the input's H×W.
    for arch in ("DeepLabV3Plus", "DeepLabV3"):
        with pytest.raises(RuntimeError, match="divisible by"):
            _smp_model(arch, "resnet18")(torch.zeros(1, 3, 97, 131))
    for name, kwargs in [
        ("deeplabv3plus", {"aspp_channels": 8, "low_level_channels": 4, "decoder_channels": 8}),
        ("deeplabv3", {"aspp_channels": 8}),
        ("pspnet", {"head_channels": 8}),
    ]:
        model = models.create_model(
            name, num_classes=NUM_CLASSES, backbone="resnet18", head="smp", base_width=4, **kwargs
        )
        images = jnp.asarray(_images(97, 131, 3).transpose(0, 2, 3, 1))
        variables = random_variables(model, images)
        logits = jax.jit(model.apply)(variables, images)
        assert logits.shape == (2, 97, 131, NUM_CLASSES) and logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all()


def test_convert_smp_reads_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    net = _smp_model("PSPNet", "resnet18")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    model, from_file = weights.convert_smp("PSPNet", "resnet18", tmp_path / "model.safetensors")
    _, from_mapping = weights.convert_smp("PSPNet", "resnet18", state)
    assert model.head == "smp" and model.encoder_depth == 3
    jax.tree.map(np.testing.assert_array_equal, from_file, from_mapping)
    # smp builds its whole encoder; PSPNet runs it to layer2 and the rest has no twin here.
    assert not any(
        name.startswith(("layer3", "layer4")) for name in from_file["params"]["backbone"]
    )


def test_convert_smp_refuses_another_encoder_in_one_sentence():
    state = _smp_model("Unet", "resnet18").state_dict()
    with pytest.raises(
        weights.WeightsError,
        match=r"^The state dict holds an smp model with encoder 'resnet18', not 'resnet34'; "
        r"pass encoder_name='resnet18'\.$",
    ):
        weights.convert_smp("Unet", "resnet34", state)
    # Same keys, other shapes: ResNeXt-50 32x4d is told from ResNet-50 by its grouped convs.
    with torch.device("meta"):
        shapes = {
            k: v.shape
            for k, v in smp.Unet("resnext50_32x4d", encoder_weights=None).state_dict().items()
        }
    state = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    with pytest.raises(
        weights.WeightsError,
        match=r"^The state dict holds an smp model with encoder 'resnext50_32x4d', not "
        r"'resnet50'; pass encoder_name='resnext50_32x4d'\.$",
    ):
        weights.convert_smp("Unet", "resnet50", state)


def test_convert_smp_refuses_bad_input_in_one_sentence():
    state = _smp_model("DeepLabV3Plus", "resnet18").state_dict()
    with pytest.raises(
        weights.WeightsError,
        match=r"^The state dict holds an smp DeepLabV3Plus, not Unet; pass "
        r"model_name='DeepLabV3Plus'\.$",
    ):
        weights.convert_smp("Unet", "resnet18", state)
    with pytest.raises(
        weights.WeightsError,
        match=r"^Unknown smp model 'FPN'; supported: DeepLabV3, DeepLabV3Plus, PSPNet, Unet\.$",
    ):
        weights.convert_smp("FPN", "resnet18", state)
    with pytest.raises(weights.WeightsError, match=r"^Unknown smp encoder 'vgg16' for convert_smp"):
        weights.convert_smp("DeepLabV3Plus", "vgg16", state)
    with pytest.raises(
        weights.WeightsError,
        match=r"^convert_smp does not support smp's decoder_attention_type for DeepLabV3Plus; "
        r"supported: encoder_output_stride, ",
    ):
        weights.convert_smp("DeepLabV3Plus", "resnet18", state, decoder_attention_type="scse")
    with pytest.raises(weights.WeightsError, match=r"aux_params=\{'classes': 2\} is not supported"):
        weights.convert_smp("DeepLabV3Plus", "resnet18", state, aux_params={"classes": 2})
    with pytest.raises(
        weights.WeightsError, match=r"^The state dict has no 'encoder\.\*' and 'segmentation_head"
    ):
        weights.convert_smp("DeepLabV3Plus", "resnet18", {"fc.weight": np.zeros((2, 2))})


def test_paper_configurations_stay_the_defaults():
    assert models.create_model("unet", num_classes=2).backbone == "unet"
    for name in ("deeplabv3", "deeplabv3plus", "pspnet"):
        assert models.create_model(name, num_classes=2).head == "paper"
    with pytest.raises(ValueError, match="valid heads: 'paper', 'smp'"):
        models.create_model("pspnet", num_classes=2, head="mmseg")
    with pytest.raises(ValueError, match="has no auxiliary head"):
        models.create_model("pspnet", num_classes=2, head="smp", aux_head=True)
    with pytest.raises(
        ValueError,
        match=r"^Encoder 'xception65' cannot dilate smp's way, which DeepLab v3\+ needs; encoders "
        r"that can: 'resnet18', ",
    ):
        models.create_model("deeplabv3plus", num_classes=2, head="smp", backbone="xception65")
    model = models.create_model("deeplabv3", num_classes=2, head="smp", backbone="mobilenet_v2")
    assert model.valid_backbones() == backbones.names("smp")


@pytest.mark.parametrize(
    "in_size, out_size", [(5, 10), (7, 17), (13, 5), (3, 97), (49, 97), (6, 6), (1, 4)]
)
def test_resizes_match_pytorch_interpolate(in_size, out_size):
    x = np.random.default_rng(0).standard_normal((1, 2, in_size, in_size + 2), np.float32)
    size = (out_size, out_size + 3)
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    for ours, kwargs in [
        (heads.resize_nearest, {"mode": "nearest"}),
        (heads.resize_bilinear_aligned, {"mode": "bilinear", "align_corners": True}),
    ]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, **kwargs)
        np.testing.assert_allclose(
            np.asarray(ours(nhwc, size)), ref.numpy().transpose(0, 2, 3, 1), atol=1e-6
        )
