"""Fully Convolutional Networks: FCN-32s, FCN-16s, FCN-8s (Long, Shelhamer & Darrell, CVPR 2015).

Faithful to the reference Caffe nets (fcn.berkeleyvision.org ``voc-fcn{32,16,8}s``):

  conv1_1 pads 100, pools round up (Caffe ceil mode), so any H×W input survives fc6;
  fc6 = 7×7 VALID conv (6×6 for AlexNet), fc7 = 1×1 conv, both ReLU + dropout 0.5;
  score_fr = 1×1 conv to num_classes;
  FCN-32s: upscore (64×64, stride 32), crop offset 19;
  FCN-16s: upscore2 (4×4, s2) + crop(score_pool4, 5), upscore16 (32×32, s16), crop 27;
  FCN-8s:  upscore2 + crop(score_pool4, 5) -> upscore_pool4 (4×4, s2) + crop(score_pool3, 9)
           -> upscore8 (16×16, s8), crop 31;
  FCN-AlexNet (32s only): fc6 6×6, upscore 63×63 stride 32, crop 18.

The offsets are Caffe's ``coord_map`` results: every layer maps its coordinate u to the input's
as x = s·u + (k − 1)/2 − p (a transposed conv inverts that). Composed through the VGG layers,
pool3, pool4 and score_fr cells sit at x = 8u − 95.5, 16u − 91.5 and 32u + 12.5, which gives the
offsets above; with ceil-mode pooling the cropped windows always fit, for every H, W (floor
pooling, torchvision's default, would not). The transposed convs have no bias and start as
bilinear interpolation; the paper learns the 2× ones, the released nets keep all of them fixed
(lr_mult 0), which in flaxseg is the optimizer's choice (mask the ``upscore*`` kernels). The
score layers (score_fr, score_pool4, score_pool3) start at zero like the reference (Caffe's
default filler).

``at_once=True`` is the "at-once" net (``voc-fcn8s-atonce``, trained end to end instead of
stage by stage): pool4 and pool3 are multiplied by 0.01 and 0.0001 (fixed Caffe ``Scale``
layers) before their score layers, so that the skips start small next to the score of fc7. The
parameters are the staged net's; only the skip inputs are scaled.

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import VGGS
from flaxseg.models.base import PretrainedBackbone, SegmentationModel
from flaxseg.models.layers import ConvTransposeUpsample, check_one_of, crop_to

BACKBONES = VGGS + ("alexnet",)

# (kernel size, crop offset) of the final upsampling, per backbone family and prediction stride.
_FINAL_UPSAMPLING = {
    ("vgg", 32): (64, 19),
    ("vgg", 16): (32, 27),
    ("vgg", 8): (16, 31),
    ("alexnet", 32): (63, 18),
}
_FINAL_UPSAMPLING_NAME = {32: "upscore", 16: "upscore16", 8: "upscore8"}
# Skip connections in fusion order: (backbone stride, Caffe name, crop offset, 2× upsampler name,
# the at-once net's input scale).
_SKIPS = ((16, "pool4", 5, "upscore2", 0.01), (8, "pool3", 9, "upscore_pool4", 0.0001))


class FCN(SegmentationModel):
    """FCN with predictions at ``prediction_stride`` 32, 16 or 8 (FCN-32s/16s/8s).

    Attributes:
      num_classes: output channels of the logits.
      prediction_stride: 32 (no skips), 16 (+ pool4) or 8 (+ pool4 + pool3).
      backbone: 'vgg16', 'vgg16_bn', or 'alexnet' (prediction_stride 32 only).
      at_once: scale pool4 by 0.01 and pool3 by 0.0001 before scoring (``voc-fcn8s-atonce``).
      base_width: backbone width knob (64 = the paper's).
      fc_channels: width of fc6/fc7 (4096 = the paper's).
      dropout_rate: dropout after fc6 and fc7; ``train=True`` needs ``rngs={'dropout': key}``
        (and ``mutable=['batch_stats']`` with 'vgg16_bn').
    """

    TITLE = "FCN"

    prediction_stride: int = 32
    backbone: str = "vgg16"
    at_once: bool = False
    base_width: int = 64
    fc_channels: int = 4096
    dropout_rate: float = 0.5

    def check_arguments(self) -> None:
        check_one_of("FCN prediction_stride", self.prediction_stride, tuple(_FINAL_UPSAMPLING_NAME))
        if self.backbone == "alexnet" and self.prediction_stride != 32:
            raise ValueError(
                f"Backbone 'alexnet' is only available for FCN-32s, not "
                f"FCN-{self.prediction_stride}s; use one of {', '.join(map(repr, VGGS))}."
            )

    def valid_backbones(self) -> tuple[str, ...]:
        return BACKBONES if self.prediction_stride == 32 else VGGS

    def pretrained_backbone(self) -> PretrainedBackbone:
        return PretrainedBackbone(self.backbone, fc_layers=("fc6", "fc7"))

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        alexnet = self.backbone == "alexnet"
        # Caffe's geometry: conv1_1 pads 100 and pools round up (see the module docstring).
        features = self.create_backbone(first_conv_padding=100, pooling="ceil")(
            images.astype(self.dtype), train
        )

        x = features[32]
        for name, k in (("fc6", 6 if alexnet else 7), ("fc7", 1)):
            x = nn.Conv(
                self.fc_channels,
                (k, k),
                padding="VALID",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))

        score_conv = functools.partial(
            nn.Conv,
            self.num_classes,
            (1, 1),
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        upsample = functools.partial(
            ConvTransposeUpsample, self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype
        )
        score = score_conv(name="score_fr")(x)

        for stride, pool, offset, up_name, at_once_scale in _SKIPS:
            if stride < self.prediction_stride:
                break
            score = upsample(4, 2, name=up_name)(score)
            skip = features[stride] * at_once_scale if self.at_once else features[stride]
            skip = score_conv(name=f"score_{pool}")(skip)
            score = score + crop_to(skip, offset, offset, score.shape[1], score.shape[2])

        kernel, offset = _FINAL_UPSAMPLING[
            ("alexnet" if alexnet else "vgg", self.prediction_stride)
        ]
        score = upsample(
            kernel, self.prediction_stride, name=_FINAL_UPSAMPLING_NAME[self.prediction_stride]
        )(score)
        return crop_to(score, offset, offset, *images.shape[1:3]).astype(jnp.float32)


FCN32s = functools.partial(FCN, prediction_stride=32)
FCN16s = functools.partial(FCN, prediction_stride=16)
FCN8s = functools.partial(FCN, prediction_stride=8)
