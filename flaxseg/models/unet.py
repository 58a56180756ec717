"""U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015), optionally with a ResNet encoder.

The paper's network: four contracting levels of two 3×3 conv + ReLU followed by a 2×2 stride-2
max-pool, widths 64, 128, 256, 512, a 1024-wide bottom level, then four expanding levels of a
2×2 up-convolution halving the channels, concatenation with the encoder map of that level, and
two 3×3 conv + ReLU; a final 1×1 conv gives the class scores.

``padding='valid'`` is the paper exactly: unpadded convolutions, so a 572×572 tile gives
388×388 scores for its centre (the overlap-tile strategy), and each encoder map is
centre-cropped to the up-convolution's size before concatenation. The logits are then smaller
than the input (by 184 px for inputs whose pooled sizes are all even), so this mode is for
tiled inference, not for the training loop.

``padding='same'`` (default) pads every 3×3 conv by 1 and pools with rounding up, so the logits
come back at the input's size for any H, W ≥ 1: a map of odd size n pools to ⌈n/2⌉ cells, cell
i covering rows 2i and 2i + 1, and the up-convolution writes cell i back to exactly those rows;
the one overhanging row is cropped off before concatenation, so decoder and encoder stay
aligned at every level.

With ``backbone='resnet50'`` (or 101/152) the contracting path is the shared torchvision-layout
ResNet (``backbones/resnet.py``); its stride-4..16 stage outputs are the skips and the stride-32
output the bottom. Decoder widths then follow segmentation_models_pytorch's U-Net
(256, 128, 64, 32, 16 at strides 16, 8, 4, 2, 1, scaled by base_channels / 64), the two
finest levels having no skip, and BatchNorm is on by default. Up-convolutions overhang odd
sizes by at most one row and are cropped to the skip (ResNet stride-2 layers also round up).

Shapes: [B, H, W, C] images -> [B, H, W, num_classes] float32 logits ('same'), or
[B, H', W', num_classes] with H' = ``valid_output_size(H)`` ('valid').
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import RESNETS
from flaxseg.models.base import SegmentationModel
from flaxseg.models.layers import (
    ConvBNAct,
    ConvTransposeUpsample,
    Dtype,
    center_crop,
    check_at_least,
    check_one_of,
    check_rate,
    max_pool,
)

PADDINGS = ("same", "valid")
LEVELS = 4  # pools in the paper's contracting path


def _valid_sizes(size: int, levels: int) -> list[int]:
    # Each level's two 3×3 convs remove 4 pixels, pools halve (rounding down), up-convolutions
    # double.
    sizes, n = [], size
    for _ in range(levels):
        n -= 4
        sizes.append(n)
        n //= 2
    sizes.append(n - 4)
    for _ in range(levels):
        sizes.append(2 * sizes[-1] - 4)
    return sizes


def valid_output_size(size: int, levels: int = LEVELS) -> int:
    """Output size of the paper's unpadded U-Net for an input of ``size`` (572 -> 388).

    Raises ValueError when some intermediate map would vanish.
    """
    sizes = _valid_sizes(size, levels)
    if min(sizes) < 1:
        smallest = next(n for n in range(1, 64 * 2**levels) if min(_valid_sizes(n, levels)) > 0)
        raise ValueError(
            f"U-Net with padding='valid' and {levels} levels needs inputs of at least "
            f"{smallest} px, got {size}; use padding='same' for small inputs."
        )
    return sizes[-1]


class DoubleConv(nn.Module):
    """Two 3×3 conv (+ optional BN) + ReLU: one U-Net level. 'valid' removes 4 pixels."""

    features: int
    padding: str = "same"
    batchnorm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = functools.partial(
            ConvBNAct,
            self.features,
            3,
            padding=1 if self.padding == "same" else 0,
            use_bn=self.batchnorm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        return conv(name="conv2")(conv(name="conv1")(x, train), train)


class UpConv(nn.Module):
    """2×2 stride-2 up-convolution (with bias, like the paper's Caffe net) to ``features``."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return ConvTransposeUpsample(
            self.features,
            2,
            2,
            use_bias=True,
            bilinear_init=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="up",
        )(x)


class UNet(SegmentationModel):
    """U-Net; see the module docstring for the two paddings and the ResNet encoder.

    Attributes:
      num_classes: output channels of the logits.
      backbone: 'unet' (the paper's contracting path) or 'resnet50'/'resnet101'/'resnet152'.
      padding: 'same' (logits at the input size) or 'valid' (the paper; paper encoder only).
      base_channels: width of the first level (64 = the paper's); all widths scale with it
        (for a ResNet encoder it is also the ResNet's base width).
      batchnorm: BatchNorm after every decoder/encoder 3×3 conv; None = off for the paper's
        encoder (the paper has none), on with a ResNet encoder.
      dropout_rate: dropout on the bottom of the contracting path (the paper's "drop-out
        layers at the end of the contracting path"; its Caffe net uses 0.5). 0 disables it.
    ``train=True`` needs ``mutable=['batch_stats']`` with BatchNorm and ``rngs={'dropout': key}``
    with dropout.
    """

    TITLE = "U-Net"
    BACKBONES = ("unet",) + tuple(RESNETS)

    backbone: str = "unet"
    padding: str = "same"
    base_channels: int = 64
    batchnorm: bool | None = None
    dropout_rate: float = 0.0

    def check_arguments(self) -> None:
        check_one_of("U-Net padding", self.padding, PADDINGS)
        if self.padding == "valid" and self.backbone != "unet":
            raise ValueError(
                f"padding='valid' is the paper's unpadded network and needs backbone='unet', "
                f"got {self.backbone!r}."
            )
        check_at_least("base_channels", self.base_channels)
        check_rate("dropout_rate", self.dropout_rate)

    @property
    def use_batchnorm(self) -> bool:
        return (self.backbone != "unet") if self.batchnorm is None else self.batchnorm

    def _level(self, features: int, name: str) -> DoubleConv:
        return DoubleConv(
            features, self.padding, self.use_batchnorm, self.dtype, self.param_dtype, name=name
        )

    def _up(
        self, x: jax.Array, skip: jax.Array | None, features: int, level: int, train: bool
    ) -> jax.Array:
        x = UpConv(features, self.dtype, self.param_dtype, name=f"up{level}")(x)
        if skip is not None:
            if self.padding == "valid":
                skip = center_crop(skip, x.shape[1], x.shape[2])
            else:
                x = x[:, : skip.shape[1], : skip.shape[2], :]
            x = jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1)
        return self._level(features, f"dec{level}")(x, train)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        height, width = images.shape[1:3]
        if self.padding == "valid":
            for n in (height, width):
                valid_output_size(n)  # one clear error for inputs too small to survive
        x = images.astype(self.dtype)
        if self.backbone == "unet":
            skips = {}
            for level in range(LEVELS):
                x = self._level(self.base_channels * 2**level, f"enc{level}")(x, train)
                skips[2**level] = x
                x = max_pool(x, 2, 2, ceil_mode=self.padding == "same")
            x = self._level(self.base_channels * 2**LEVELS, f"enc{LEVELS}")(x, train)
            width_at = lambda stride: self.base_channels * stride  # noqa: E731
        else:
            features = self.create_backbone(base_width=self.base_channels)(x, train)
            x = features[32]
            skips = {stride: features[stride] for stride in (4, 8, 16)}
            width_at = lambda stride: self.base_channels * stride // 4  # noqa: E731
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

        stride = 2**LEVELS if self.backbone == "unet" else 32
        while stride > 1:
            stride //= 2
            level = stride.bit_length() - 1
            x = self._up(x, skips.get(stride), width_at(stride), level, train)
        if self.padding == "same":
            x = x[:, :height, :width, :]  # ResNet encoder: no stride-1 skip crops the overhang
        logits = nn.Conv(
            self.num_classes,
            (1, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(x)
        # 'valid' logits cover the input's centre only (the overlap-tile strategy): no resize.
        return (
            logits.astype(jnp.float32) if self.padding == "valid" else self.finish(logits, images)
        )
