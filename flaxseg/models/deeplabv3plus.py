"""DeepLab v3+ (Chen, Zhu, Papandreou, Schroff & Adam, "Encoder-Decoder with Atrous Separable
Convolution for Semantic Image Segmentation", ECCV 2018).

Encoder: DeepLab v3 — dilated backbone (output stride 16 by default) and ASPP (rates
(6, 12, 18) at stride 16, scaled with it; 256 channels; dropout 0.1 after the projection as in
the reference implementation). Decoder (Sec. 3.1, Fig. 2): the stride-4 backbone features are
projected by a 1×1 conv to 48 channels (+ BN + ReLU), concatenated with the encoder output
bilinearly upsampled to their size (×4 at output stride 16), refined by two 3×3 convs of 256
(+ BN + ReLU), classified by a 1×1 conv and upsampled bilinearly to the input size.

With the Xception-65 backbone the ASPP atrous convs and the decoder convs are depthwise-separable
(Sec. 3.2: "we apply the depthwise separable convolution to both ASPP and decoder modules");
``separable`` overrides that choice. Multi-grid defaults to (1, 2, 4) on ResNets and none on
Xception, as in the reference configurations.

``head='smp'`` is segmentation_models_pytorch's ``DeepLabV3Plus`` (smp 0.6.0), whose head
differs from the paper's: encoder dilated smp's way (every unit of a dilated stage at the
stage's rate, ``dilation_style='smp'``), no multi-grid; ASPP rates (12, 24, 36) at any output
stride (smp's ``decoder_atrous_rates``, not rescaled), separable ASPP branches by default
(smp's ``SeparableConv2d``: depthwise → pointwise → BN → ReLU, ``heads.SMPSeparableConvBNAct``),
dropout 0.5; then one more separable conv + BN + ReLU, bilinear upsampling with
``align_corners=True`` to the stride-4 map, concatenation with its 1×1 conv 48 + BN + ReLU, a
single separable conv 256 + BN + ReLU, a 1×1 classifier and ``align_corners=True`` upsampling
to the input. Its weights convert with ``flaxseg.weights.convert_smp``. smp refuses inputs
that are not multiples of the output stride (×4 and ×4 are then exact); this model resizes to
the stride-4 map's and the input's sizes instead, so it runs at any H, W and equals smp's
wherever smp runs.

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import Needs
from flaxseg.models.base import PretrainedBackbone, SegmentationModel
from flaxseg.models.heads import (
    ASPP,
    SMP_ATROUS_RATES,
    SMPSeparableConvBNAct,
    SMPTwin,
    default_multi_grid,
    resize_bilinear_aligned,
    scale_atrous_rates,
    smp_aspp_key_map,
    smp_separable_key_map,
)
from flaxseg.models.layers import (
    ConvBNAct,
    KeyMap,
    SeparableConv,
    check_choice,
    conv_bn_key_map,
    conv_key_map,
    resize_bilinear,
)

HEADS = ("paper", "smp")


class DeepLabV3Plus(SegmentationModel):
    """DeepLab v3+ (see the module docstring).

    Attributes:
      num_classes: output channels.
      backbone: an encoder with stride-4 features and multi-grid that dilates to output stride
        8 and 16 ('resnet50', 'resnet101', 'resnet152', 'xception65', ...); with ``head='smp'``
        one that dilates smp's way ('resnet50', 'mobilenet_v2', 'efficientnet-b0', ...).
      output_stride: 8, 16 (default) or 32 of the encoder; the decoder always works at stride 4.
        Changes no parameter shape (override per call with ``apply(..., output_stride=8)``).
      multi_grid: last-stage unit rates (default: see the module docstring).
      separable: depthwise-separable ASPP and decoder convs (default: with Xception; always
        on with ``head='smp'``, where it sets the ASPP's only, as smp's
        ``decoder_aspp_separable``).
      atrous_rates: ASPP rates at output stride 16 (scaled with it); with ``head='smp'`` the
        rates at any stride (default (12, 24, 36)).
      head: 'paper' or 'smp' (see the module docstring).
      aspp_channels, low_level_channels, decoder_channels, base_width: widths (256, 48, 256, 64
        are the paper's); ``num_middle_units`` is Xception's middle-flow depth (16).
    ``train=True`` needs ``mutable=['batch_stats']`` and ``rngs={'dropout': key}``.
    """

    TITLE = "DeepLab v3+"
    SMP_TWIN = SMPTwin(
        name="DeepLabV3Plus",
        decoder_prefix="decoder.aspp.0.convs.",
        kwargs=(
            "encoder_output_stride",
            "decoder_channels",
            "decoder_atrous_rates",
            "decoder_aspp_separable",
        ),
        model_kwargs=lambda smp_kwargs: smp_deeplabv3plus_kwargs(smp_kwargs),
        key_map=lambda model: smp_deeplabv3plus_key_map(model),
    )

    backbone: str = "resnet101"
    output_stride: int = 16
    multi_grid: tuple[int, ...] | None = None
    separable: bool | None = None
    atrous_rates: tuple[int, ...] | None = None
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    base_width: int = 64
    num_middle_units: int = 16
    head: str = "paper"

    def check_arguments(self) -> None:
        check_choice(self.head, HEADS, "DeepLab v3+ head")

    def encoder_needs(self) -> Needs:
        # The decoder's stride-4 features and the ASPP's stride-32 ones, at output stride 8/16.
        if self.head == "smp":
            return Needs((4, 32), (8, 16), dilation_style="smp")
        return Needs((4, 32), (8, 16), multi_grid=True)

    def pretrained_backbone(self) -> PretrainedBackbone:
        return PretrainedBackbone(self.backbone, num_middle_units=self.num_middle_units)

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, output_stride: int | None = None
    ) -> jax.Array:
        output_stride = self.resolve_output_stride(output_stride)
        if self.head == "smp":
            return self._smp(images, train, output_stride)
        xception = self.backbone == "xception65"
        separable = xception if self.separable is None else self.separable
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        extra = {"num_middle_units": self.num_middle_units} if xception else {}

        features = self.create_backbone(
            output_stride=output_stride,
            multi_grid=self.multi_grid or default_multi_grid(self.backbone),
            **extra,
        )(images, train)
        rates = scale_atrous_rates(self.atrous_rates or (6, 12, 18), 16, output_stride)
        x = ASPP(
            self.aspp_channels, rates, separable=separable, dropout_rate=0.1, name="aspp", **kw
        )(features[32], train)

        low_level = ConvBNAct(self.low_level_channels, 1, name="low_level_project", **kw)(
            features[4], train
        )
        x = resize_bilinear(x, low_level.shape[1:3])
        x = jnp.concatenate([x, low_level], axis=-1)
        for i in range(2):
            if separable:
                conv = SeparableConv(
                    self.decoder_channels, activation=nn.relu, name=f"decoder_{i}", **kw
                )
            else:
                conv = ConvBNAct(self.decoder_channels, 3, name=f"decoder_{i}", **kw)
            x = conv(x, train)
        x = nn.Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
        return self.finish(x, images)

    def _smp(self, images: jax.Array, train: bool, output_stride: int) -> jax.Array:
        # smp's DeepLabV3PlusDecoder + SegmentationHead(kernel_size=1, upsampling=4).
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        separable = True if self.separable is None else self.separable
        features = self.create_backbone(output_stride=output_stride, dilation_style="smp")(
            images, train
        )
        x = ASPP(
            self.aspp_channels,
            self.atrous_rates or SMP_ATROUS_RATES,
            separable=separable,
            separable_style="smp",
            dropout_rate=0.5,
            name="aspp",
            **kw,
        )(features[32], train)
        x = SMPSeparableConvBNAct(self.aspp_channels, name="aspp_conv", **kw)(x, train)
        low_level = ConvBNAct(self.low_level_channels, 1, name="low_level_project", **kw)(
            features[4], train
        )
        x = resize_bilinear_aligned(x, low_level.shape[1:3])
        x = jnp.concatenate([x, low_level], axis=-1)
        x = SMPSeparableConvBNAct(self.decoder_channels, name="decoder_0", **kw)(x, train)
        x = nn.Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
        return resize_bilinear_aligned(x, images.shape[1:3]).astype(jnp.float32)


def smp_deeplabv3plus_key_map(model: DeepLabV3Plus) -> KeyMap:
    """Flax paths of a ``DeepLabV3Plus(head='smp')``'s decoder and head -> keys of smp's
    ``DeepLabV3Plus`` state dict; the encoder's part (``encoder.*``) is the backbone's key map."""
    separable = True if model.separable is None else model.separable
    rates = model.atrous_rates or SMP_ATROUS_RATES
    return {
        **smp_aspp_key_map(("aspp",), "decoder.aspp.0", separable, len(rates)),
        **smp_separable_key_map(("aspp_conv",), "decoder.aspp.1", "decoder.aspp.2"),
        **conv_bn_key_map(("low_level_project",), "decoder.block1.0", "decoder.block1.1"),
        **smp_separable_key_map(("decoder_0",), "decoder.block2.0", "decoder.block2.1"),
        **conv_key_map(("classifier",), "segmentation_head.0", bias=True),
    }


def smp_deeplabv3plus_kwargs(smp_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``DeepLabV3Plus(head='smp')`` arguments for smp ``DeepLabV3Plus``'s keyword arguments."""
    kwargs = {
        "head": "smp",
        "output_stride": smp_kwargs.get("encoder_output_stride", 16),
        "aspp_channels": smp_kwargs.get("decoder_channels", 256),
        "decoder_channels": smp_kwargs.get("decoder_channels", 256),
        "separable": bool(smp_kwargs.get("decoder_aspp_separable", True)),
    }
    if "decoder_atrous_rates" in smp_kwargs:
        kwargs["atrous_rates"] = tuple(smp_kwargs["decoder_atrous_rates"])
    return kwargs
