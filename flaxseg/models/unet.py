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

With an encoder backbone (``backbone='resnet34'``, any registered encoder that gives the
stride-2, 4, 8, 16 and 32 feature maps, ``ENCODER_NEEDS``) the network is
segmentation_models_pytorch's ``Unet`` (smp 0.6.0, ``encoder_depth=5``), which has no paper
form: the encoder's stride-2 (stem), 4, 8 and 16 feature maps are the skips and its stride-32
map the bottom; five decoder blocks each upsample by nearest-neighbour interpolation to the size
of the next finer map (PyTorch's 'nearest' indices, ``heads.resize_nearest``), concatenate
[upsampled, skip] (the last block, at the input size, has no skip) and apply two 3×3
conv + BN + ReLU of ``decoder_channels`` (256, 128, 64, 32, 16, scaled by base_channels / 64);
a 3×3 conv with bias gives the logits. ``create_model('unet', backbone='resnet34',
in_channels=1, num_classes=3)`` is ``smp.Unet('resnet34', in_channels=1, classes=3)``, and its
weights convert with ``flaxseg.weights.convert_smp``. smp's U-Net sizes every upsampling by the
skip it meets, so it also runs at sizes that are not multiples of 32, and so does this one,
identically (the encoder's stride-2 layers map n to ⌈n / 2⌉ as PyTorch's do).

Shapes: [B, H, W, C] images -> [B, H, W, num_classes] float32 logits ('same'), or
[B, H', W', num_classes] with H' = ``valid_output_size(H)`` ('valid').
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import Needs
from flaxseg.models.base import SegmentationModel
from flaxseg.models.heads import SMPTwin, resize_nearest
from flaxseg.models.layers import (
    ConvBNAct,
    ConvTransposeUpsample,
    Dtype,
    KeyMap,
    center_crop,
    check_at_least,
    check_one_of,
    check_rate,
    conv_bn_key_map,
    conv_key_map,
    he_normal_fan_in,
    max_pool,
)

PADDINGS = ("same", "valid")
LEVELS = 4  # pools in the paper's contracting path
SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's default, at strides 16, 8, 4, 2, 1


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
    """Two 3×3 conv (+ optional BN) + ReLU: one U-Net level. 'valid' removes 4 pixels.

    Kernels start He-normal over the *incoming* connections, std √(2 / N) with N = 9·C_in (the
    paper, Sec. 3); smp's decoder (``initialize_decoder``: ``kaiming_uniform_``, fan_in) has the
    same variance with a uniform distribution.
    """

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
            kernel_init=he_normal_fan_in(),
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
    """U-Net; see the module docstring for the two paddings and the encoder backbones.

    Attributes:
      num_classes: output channels of the logits.
      backbone: 'unet' (the paper's contracting path) or an encoder with stride-2…32 features
        ('resnet34', 'efficientnet-b0', ...: smp's U-Net).
      padding: 'same' (logits at the input size) or 'valid' (the paper; paper encoder only).
      base_channels: width of the first level (64 = the paper's); all widths scale with it
        (for an encoder it is also the encoder's base width and scales ``decoder_channels``).
      decoder_channels: the encoder U-Net's five decoder widths at 64 base channels (smp's).
      batchnorm: BatchNorm after every decoder/encoder 3×3 conv; None = off for the paper's
        encoder (the paper has none), on with an encoder backbone (smp's default).
      dropout_rate: dropout on the bottom of the contracting path (the paper's "drop-out
        layers at the end of the contracting path"; its Caffe net uses 0.5). 0 disables it.
    ``train=True`` needs ``mutable=['batch_stats']`` with BatchNorm and ``rngs={'dropout': key}``
    with dropout.
    """

    TITLE = "U-Net"
    BACKBONES = ("unet",)
    # smp's U-Net: the stem's stride-2 map and the 4, 8, 16 maps are skips, stride 32 the bottom.
    ENCODER_NEEDS = Needs(strides=(2, 4, 8, 16, 32))
    SMP_TWIN = SMPTwin(
        name="Unet",
        decoder_prefix="decoder.blocks.",
        kwargs=("decoder_channels", "decoder_use_norm", "encoder_depth", "decoder_interpolation"),
        model_kwargs=lambda smp_kwargs: smp_unet_kwargs(smp_kwargs),
        key_map=lambda model: smp_unet_key_map(model),
    )

    backbone: str = "unet"
    padding: str = "same"
    base_channels: int = 64
    decoder_channels: tuple[int, ...] = SMP_DECODER_CHANNELS
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
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError(
                f"decoder_channels must be 5 positive widths (strides 16, 8, 4, 2, 1), got "
                f"{tuple(self.decoder_channels)!r}."
            )
        check_rate("dropout_rate", self.dropout_rate)

    @property
    def use_batchnorm(self) -> bool:
        return (self.backbone != "unet") if self.batchnorm is None else self.batchnorm

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """The encoder U-Net's decoder widths at this ``base_channels``."""
        return tuple(max(1, c * self.base_channels // 64) for c in self.decoder_channels)

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
        if self.backbone != "unet":
            return self._encoder_unet(images, train)
        height, width = images.shape[1:3]
        if self.padding == "valid":
            for n in (height, width):
                valid_output_size(n)  # one clear error for inputs too small to survive
        x = images.astype(self.dtype)
        skips = {}
        for level in range(LEVELS):
            x = self._level(self.base_channels * 2**level, f"enc{level}")(x, train)
            skips[2**level] = x
            x = max_pool(x, 2, 2, ceil_mode=self.padding == "same")
        x = self._level(self.base_channels * 2**LEVELS, f"enc{LEVELS}")(x, train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

        stride = 2**LEVELS
        while stride > 1:
            stride //= 2
            level = stride.bit_length() - 1
            x = self._up(x, skips.get(stride), self.base_channels * stride, level, train)
        if self.padding == "same":
            x = x[:, :height, :width, :]
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

    def _encoder_unet(self, images: jax.Array, train: bool) -> jax.Array:
        # smp's Unet: decoder block i upsamples to the next finer map's size (the input's for
        # the last), concatenates [x, skip] and applies two conv + BN + ReLU.
        features = self.create_backbone(base_width=self.base_channels)(images, train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(features[32])
        stride = 32
        for block, width in enumerate(self.decoder_widths):
            stride //= 2
            skip = features.get(stride) if stride > 1 else None
            x = resize_nearest(x, images.shape[1:3] if skip is None else skip.shape[1:3])
            if skip is not None:
                x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self._level(width, f"decoder_{block}")(x, train)
        logits = nn.Conv(
            self.num_classes,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="segmentation_head",
        )(x)
        return self.finish(logits, images)


def smp_unet_key_map(model: UNet) -> KeyMap:
    """Flax paths of an encoder ``UNet``'s decoder and head -> keys of smp's ``Unet`` state dict
    (``decoder.blocks.<i>.conv<j>.<0|1>``, ``segmentation_head.0``); the encoder's part
    (``encoder.*``) is the backbone's key map."""
    key_map = {}
    for block in range(len(model.decoder_channels)):
        for conv in ("conv1", "conv2"):
            prefix, torch = (f"decoder_{block}", conv), f"decoder.blocks.{block}.{conv}"
            if model.use_batchnorm:
                key_map.update(conv_bn_key_map(prefix, f"{torch}.0", f"{torch}.1"))
            else:
                key_map.update(conv_key_map((*prefix, "conv"), f"{torch}.0", bias=True))
    key_map.update(conv_key_map(("segmentation_head",), "segmentation_head.0", bias=True))
    return key_map


def smp_unet_kwargs(smp_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``UNet`` arguments for smp ``Unet``'s keyword arguments (``SMPTwin.kwargs``)."""
    get = smp_kwargs.get
    if get("encoder_depth", 5) != 5 or get("decoder_interpolation", "nearest") != "nearest":
        raise ValueError(
            "convert_smp builds smp's Unet with encoder_depth=5 and "
            "decoder_interpolation='nearest' only, got "
            f"encoder_depth={get('encoder_depth', 5)!r}, "
            f"decoder_interpolation={get('decoder_interpolation', 'nearest')!r}."
        )
    norm = get("decoder_use_norm", "batchnorm")
    if norm not in (True, False, "batchnorm", "identity"):
        raise ValueError(
            f"convert_smp supports decoder_use_norm 'batchnorm' (True) or 'identity' "
            f"(False), got {norm!r}."
        )
    kwargs = {"batchnorm": norm in (True, "batchnorm")} if "decoder_use_norm" in smp_kwargs else {}
    if "decoder_channels" in smp_kwargs:
        kwargs["decoder_channels"] = tuple(smp_kwargs["decoder_channels"])
    return kwargs
