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

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import DILATED
from flaxseg.models.base import PretrainedBackbone, SegmentationModel
from flaxseg.models.heads import ASPP, default_multi_grid, scale_atrous_rates
from flaxseg.models.layers import ConvBNAct, SeparableConv, resize_bilinear


class DeepLabV3Plus(SegmentationModel):
    """DeepLab v3+ (see the module docstring).

    Attributes:
      num_classes: output channels.
      backbone: 'resnet50', 'resnet101', 'resnet152' or 'xception65'.
      output_stride: 8, 16 (default) or 32 of the encoder; the decoder always works at stride 4.
        Changes no parameter shape (override per call with ``apply(..., output_stride=8)``).
      multi_grid: last-stage unit rates (default: see the module docstring).
      separable: depthwise-separable ASPP and decoder convs (default: with Xception).
      atrous_rates: ASPP rates at output stride 16.
      aspp_channels, low_level_channels, decoder_channels, base_width: widths (256, 48, 256, 64
        are the paper's); ``num_middle_units`` is Xception's middle-flow depth (16).
    ``train=True`` needs ``mutable=['batch_stats']`` and ``rngs={'dropout': key}``.
    """

    TITLE = "DeepLab v3+"
    BACKBONES = DILATED

    backbone: str = "resnet101"
    output_stride: int = 16
    multi_grid: tuple[int, ...] | None = None
    separable: bool | None = None
    atrous_rates: tuple[int, ...] = (6, 12, 18)
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    base_width: int = 64
    num_middle_units: int = 16

    def pretrained_backbone(self) -> PretrainedBackbone:
        return PretrainedBackbone(self.backbone, num_middle_units=self.num_middle_units)

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, output_stride: int | None = None
    ) -> jax.Array:
        output_stride = self.resolve_output_stride(output_stride)
        xception = self.backbone == "xception65"
        separable = xception if self.separable is None else self.separable
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        extra = {"num_middle_units": self.num_middle_units} if xception else {}

        features = self.create_backbone(
            output_stride=output_stride,
            multi_grid=self.multi_grid or default_multi_grid(self.backbone),
            **extra,
        )(images, train)
        rates = scale_atrous_rates(self.atrous_rates, 16, output_stride)
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
