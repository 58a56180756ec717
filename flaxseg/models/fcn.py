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
default filler). We use the standard staged nets' unscaled skip scores, not the "at-once"
variant that multiplies pool4/pool3 by 0.01/0.0001 before scoring.

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import AlexNet, VGG16, torchvision_alexnet_key_map
from flaxseg.models.backbones import torchvision_vgg16_key_map
from flaxseg.models.layers import (ConvTransposeUpsample, Dtype, check_at_least, check_choice,
                                   check_one_of, crop_to)

VGG_BACKBONES = ("vgg16", "vgg16_bn")
BACKBONES = VGG_BACKBONES + ("alexnet",)

# (kernel size, crop offset) of the final upsampling, per backbone family and prediction stride.
_FINAL_UPSAMPLING = {
    ("vgg", 32): (64, 19),
    ("vgg", 16): (32, 27),
    ("vgg", 8): (16, 31),
    ("alexnet", 32): (63, 18),
}
_FINAL_UPSAMPLING_NAME = {32: "upscore", 16: "upscore16", 8: "upscore8"}
# Skip connections in fusion order: (backbone stride, Caffe name, crop offset, 2× upsampler name).
_SKIPS = ((16, "pool4", 5, "upscore2"), (8, "pool3", 9, "upscore_pool4"))


def _backbone_family(backbone: str) -> str:
    return "vgg" if backbone in VGG_BACKBONES else backbone


def _make_backbone(backbone: str, base_width: int, dtype: Dtype, param_dtype: Dtype) -> nn.Module:
    if backbone == "alexnet":
        return AlexNet(base_width=base_width, first_conv_padding=100, ceil_mode=True,
                       dtype=dtype, param_dtype=param_dtype, name="backbone")
    return VGG16(base_width=base_width, batchnorm=backbone == "vgg16_bn", first_conv_padding=100,
                 ceil_mode=True, dtype=dtype, param_dtype=param_dtype, name="backbone")


class FCN(nn.Module):
    """FCN with predictions at ``prediction_stride`` 32, 16 or 8 (FCN-32s/16s/8s).

    Attributes:
      num_classes: output channels of the logits.
      prediction_stride: 32 (no skips), 16 (+ pool4) or 8 (+ pool4 + pool3).
      backbone: 'vgg16', 'vgg16_bn', or 'alexnet' (prediction_stride 32 only).
      base_width: backbone width knob (64 = the paper's).
      fc_channels: width of fc6/fc7 (4096 = the paper's).
      dropout_rate: dropout after fc6 and fc7; ``train=True`` needs ``rngs={'dropout': key}``
        (and ``mutable=['batch_stats']`` with 'vgg16_bn').
    """

    num_classes: int
    prediction_stride: int = 32
    backbone: str = "vgg16"
    base_width: int = 64
    fc_channels: int = 4096
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        name = f"FCN-{self.prediction_stride}s"
        check_one_of("FCN prediction_stride", self.prediction_stride,
                     tuple(_FINAL_UPSAMPLING_NAME))
        valid = BACKBONES if self.prediction_stride == 32 else VGG_BACKBONES
        if self.backbone in BACKBONES and self.backbone not in valid:
            raise ValueError(
                f"Backbone {self.backbone!r} is only available for FCN-32s, not {name}; use one "
                f"of {', '.join(map(repr, VGG_BACKBONES))}.")
        check_choice(self.backbone, valid, "backbone", name)
        check_at_least("num_classes", self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        height, width = images.shape[1], images.shape[2]
        features = _make_backbone(self.backbone, self.base_width, self.dtype,
                                  self.param_dtype)(images.astype(self.dtype), train)

        x = features[32]
        fc6_kernel = 6 if self.backbone == "alexnet" else 7
        for name, k in (("fc6", fc6_kernel), ("fc7", 1)):
            x = nn.Conv(self.fc_channels, (k, k), padding="VALID", dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))

        score_conv = functools.partial(nn.Conv, self.num_classes, (1, 1),
                                       kernel_init=nn.initializers.zeros, dtype=self.dtype,
                                       param_dtype=self.param_dtype)
        upsample = functools.partial(ConvTransposeUpsample, self.num_classes, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
        score = score_conv(name="score_fr")(x)

        for stride, pool, offset, up_name in _SKIPS:
            if stride < self.prediction_stride:
                break
            score = upsample(4, 2, name=up_name)(score)
            skip = score_conv(name=f"score_{pool}")(features[stride])
            score = score + crop_to(skip, offset, offset, score.shape[1], score.shape[2])

        kernel, offset = _FINAL_UPSAMPLING[(_backbone_family(self.backbone),
                                            self.prediction_stride)]
        score = upsample(kernel, self.prediction_stride,
                         name=_FINAL_UPSAMPLING_NAME[self.prediction_stride])(score)
        return crop_to(score, offset, offset, height, width).astype(jnp.float32)


FCN32s = functools.partial(FCN, prediction_stride=32)
FCN16s = functools.partial(FCN, prediction_stride=16)
FCN8s = functools.partial(FCN, prediction_stride=8)


def torchvision_fcn_key_map(backbone: str = "vgg16") -> dict[tuple[str, ...], str]:
    """Flax paths of an FCN -> keys of torchvision's ImageNet classifier (``vgg16()`` etc.).

    Covers the backbone and fc6/fc7 (the classifier's first two Linear layers, folded into
    7×7/6×6 and 1×1 convs by ``torch_state_dict_to_variables`` given the target shapes); the
    score and upsampling layers keep their FCN initialisation. Needs base_width 64 and
    fc_channels 4096.
    """
    check_choice(backbone, BACKBONES, "FCN backbone")
    if backbone == "alexnet":
        backbone_map, fc6, fc7 = torchvision_alexnet_key_map(), "classifier.1", "classifier.4"
    else:
        backbone_map = torchvision_vgg16_key_map(batchnorm=backbone == "vgg16_bn")
        fc6, fc7 = "classifier.0", "classifier.3"
    key_map = {(path[0], "backbone") + path[1:]: key for path, key in backbone_map.items()}
    for name, torch_name in (("fc6", fc6), ("fc7", fc7)):
        key_map[("params", name, "kernel")] = f"{torch_name}.weight"
        key_map[("params", name, "bias")] = f"{torch_name}.bias"
    return key_map
