"""DeepLab v3 (Chen, Papandreou, Schroff & Adam, "Rethinking Atrous Convolution for Semantic
Image Segmentation", arXiv:1706.05587, 2017).

Dilated backbone (ResNet-101 by default, multi-grid (1, 2, 4) in layer4) → ASPP (1×1, three 3×3
atrous convs and image pooling, 256 channels each with BN + ReLU, concatenated, 1×1 projection
+ BN + ReLU) → 1×1 classifier → bilinear upsampling to the input size.

The atrous rates are (6, 12, 18) at output stride 16 and scale with it (doubled at 8), as the
paper prescribes. ``output_stride`` only changes strides and rates, never a parameter shape:
train at 16 and evaluate at 8 by building the model again with ``output_stride=8`` (or passing
``output_stride=8`` to ``apply``) with the same variables.

``head='torchvision'`` reproduces torchvision's ``deeplabv3_resnet50/101`` exactly (so its
checkpoints convert, see ``flaxseg.weights.convert_torchvision``): ASPP with dropout 0.5 after
the projection, then an extra 3×3 conv 256 + BN + ReLU before the classifier; its defaults are
output stride 8 and no multi-grid (torchvision's rates 12/24/36 are the paper's at stride 8).
``aux_head=True`` adds torchvision's auxiliary FCNHead on the stride-16 features (layer3); its
logits go to the ``'aux'`` collection (``layers.sow_aux_logits``).

``head='smp'`` is segmentation_models_pytorch's ``DeepLabV3`` (smp 0.6.0): torchvision's head
(ASPP with dropout 0.5, 3×3 conv 256 + BN + ReLU, 1×1 classifier), output stride 8 by default,
but the encoder dilated smp's way (every unit of a dilated stage at the stage's rate,
``dilation_style='smp'``), ASPP rates (12, 24, 36) at any output stride (smp's
``decoder_atrous_rates``, not rescaled) and the logits upsampled with ``align_corners=True``.
Its weights convert with ``flaxseg.weights.convert_smp``. smp refuses inputs that are not
multiples of the output stride (where its ×8 upsampling is the resize to the input); this
model resizes to the input's H×W at any size.

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import Needs
from flaxseg.models.backbones.resnet import torchvision_resnet_key_map
from flaxseg.models.base import SegmentationModel
from flaxseg.models.heads import (
    ASPP,
    SMP_ATROUS_RATES,
    SMPTwin,
    default_multi_grid,
    resize_bilinear_aligned,
    scale_atrous_rates,
    smp_aspp_key_map,
    torchvision_aspp_key_map,
    torchvision_fcn_head_key_map,
)
from flaxseg.models.layers import (
    ConvBNAct,
    KeyMap,
    check_choice,
    conv_bn_key_map,
    conv_key_map,
    prefix_key_map,
)

HEADS = ("paper", "torchvision", "smp")


class DeepLabV3(SegmentationModel):
    """DeepLab v3 (see the module docstring).

    Attributes:
      num_classes: output channels.
      backbone: an encoder with multi-grid that dilates to output stride 8 and 16 ('resnet50',
        'resnet101', 'resnet152', 'xception65', ...); with ``head='smp'`` one that dilates
        smp's way ('resnet50', 'mobilenet_v2', 'efficientnet-b0', ...).
      output_stride: 8, 16 or 32; default 16 ('paper') or 8 ('torchvision', 'smp').
      multi_grid: layer4 unit rates; default (1, 2, 4) for ResNets with the paper head, else none
        (with ``head='smp'`` none is passed, so encoders without multi-grid work too).
      head: 'paper', 'torchvision' or 'smp' (see the module docstring).
      aux_head: torchvision's auxiliary FCNHead on the stride-16 features.
      atrous_rates: ASPP rates at output stride 16 (scaled with it; default (6, 12, 18)); with
        ``head='smp'`` the rates at any stride (default (12, 24, 36)).
      aspp_channels, base_width: width knobs (256 and 64 are the paper's).
    ``train=True`` needs ``mutable=['batch_stats']`` (and ``'aux'`` with ``aux_head``) and
    ``rngs={'dropout': key}``.
    """

    TITLE = "DeepLab v3"
    SMP_TWIN = SMPTwin(
        name="DeepLabV3",
        decoder_prefix="decoder.aspp.convs.",
        kwargs=("encoder_output_stride", "decoder_channels", "decoder_atrous_rates"),
        model_kwargs=lambda smp_kwargs: smp_deeplabv3_kwargs(smp_kwargs),
        key_map=lambda model: smp_deeplabv3_key_map(model),
    )

    backbone: str = "resnet101"
    output_stride: int | None = None
    multi_grid: tuple[int, ...] | None = None
    head: str = "paper"
    aux_head: bool = False
    atrous_rates: tuple[int, ...] | None = None
    aspp_channels: int = 256
    base_width: int = 64

    def check_arguments(self) -> None:
        check_choice(self.head, HEADS, "DeepLab v3 head")

    def encoder_needs(self) -> Needs:
        # The stride-32 features (and stride 16 for the aux head) at output stride 8 or 16.
        strides = (16, 32) if self.aux_head else (32,)
        if self.head == "smp":
            return Needs(strides, (8, 16), dilation_style="smp")
        return Needs(strides, (8, 16), multi_grid=True)

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, output_stride: int | None = None
    ) -> jax.Array:
        smp_head = self.head == "smp"
        torchvision_head = self.head == "torchvision" or smp_head  # smp's is torchvision's
        output_stride = self.resolve_output_stride(output_stride, 8 if torchvision_head else 16)
        if smp_head:  # smp's encoders have no multi-grid (and may take none: MobileNetV2)
            options = {"dilation_style": "smp", "multi_grid": self.multi_grid}
        else:
            options = {
                "multi_grid": self.multi_grid
                or ((1, 1, 1) if torchvision_head else default_multi_grid(self.backbone))
            }
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        features = self.create_backbone(output_stride=output_stride, **options)(images, train)
        if smp_head:
            rates = tuple(self.atrous_rates or SMP_ATROUS_RATES)
        else:
            rates = scale_atrous_rates(self.atrous_rates or (6, 12, 18), 16, output_stride)
        x = ASPP(
            self.aspp_channels,
            rates,
            dropout_rate=0.5 if torchvision_head else 0.1,
            name="aspp",
            **kw,
        )(features[32], train)
        if torchvision_head:
            x = ConvBNAct(self.aspp_channels, 3, name="head_conv", **kw)(x, train)
        x = nn.Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
        if self.aux_head:
            self.sow_aux_head(features[16], images, train)
        if smp_head:
            return resize_bilinear_aligned(x, images.shape[1:3]).astype(jnp.float32)
        return self.finish(x, images)


def torchvision_deeplabv3_key_map(depth: int = 101, aux_head: bool = False) -> KeyMap:
    """Flax paths of ``DeepLabV3(head='torchvision', backbone=f'resnet{depth}')`` -> keys of
    torchvision's ``deeplabv3_resnet<depth>`` state dict (``aux_classifier.*`` with
    ``aux_head``)."""
    key_map = prefix_key_map(torchvision_resnet_key_map(depth), ("backbone",), "backbone.")
    key_map.update(torchvision_aspp_key_map(("aspp",), "classifier.0"))
    key_map.update(conv_bn_key_map(("head_conv",), "classifier.1", "classifier.2"))
    key_map.update(conv_key_map(("classifier",), "classifier.4", bias=True))
    if aux_head:
        key_map.update(torchvision_fcn_head_key_map(("aux_head",), "aux_classifier"))
    return key_map


def smp_deeplabv3_key_map(model: DeepLabV3) -> KeyMap:
    """Flax paths of a ``DeepLabV3(head='smp')``'s decoder and head -> keys of smp's
    ``DeepLabV3`` state dict; the encoder's part (``encoder.*``) is the backbone's key map."""
    rates = model.atrous_rates or SMP_ATROUS_RATES
    return {
        **smp_aspp_key_map(("aspp",), "decoder.aspp", False, len(rates)),
        **conv_bn_key_map(("head_conv",), "decoder.conv", "decoder.bn"),
        **conv_key_map(("classifier",), "segmentation_head.0", bias=True),
    }


def smp_deeplabv3_kwargs(smp_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``DeepLabV3(head='smp')`` arguments for smp ``DeepLabV3``'s keyword arguments."""
    kwargs = {
        "head": "smp",
        "output_stride": smp_kwargs.get("encoder_output_stride", 8),
        "aspp_channels": smp_kwargs.get("decoder_channels", 256),
    }
    if "decoder_atrous_rates" in smp_kwargs:
        kwargs["atrous_rates"] = tuple(smp_kwargs["decoder_atrous_rates"])
    return kwargs
