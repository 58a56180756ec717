"""RefineNet (Lin, Milan, Shen & Reid, "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation", CVPR 2017): the 4-cascaded multi-path network.

Backbone: ResNet-50/101/152 (torchvision layout, output stride 32) from
``backbones/resnet.py``, whose stage outputs at 1/4, 1/8, 1/16, 1/32 feed RefineNet-1..4.

Each backbone output first passes a 3×3 convolution (no bias) that reduces it to the block's
width: 512 for the 1/32 features, 256 for the others (the reference code's ``*_dimred``
adaptation convs; the paper's Sec. 3.3 widths). RefineNet-4 takes those 1/32 features alone;
RefineNet-k (k < 4) takes stage k's features and RefineNet-(k+1)'s output. Each block:

  - adaptive convs: 2 residual conv units (RCU) per input path, at that path's width;
    an RCU is x + conv3×3(relu(conv3×3(relu(x)))) (a pre-activation residual unit without BN);
  - multi-resolution fusion (multi-input blocks only): a 3×3 conv per path to the smallest
    input width, bilinear upsampling to the largest resolution, summation;
  - ReLU, then chained residual pooling: 4 chained stages of 5×5 stride-1 max-pool + 3×3 conv,
    each stage's output added to the running sum that starts from the ReLU'd input;
  - output conv: 1 RCU.

RefineNet-1's output (1/4 resolution) gets the paper's two extra RCUs, dropout and a 3×3
classifier; the logits are upsampled bilinearly to the input. Following the reference code
(whose merged ``mflow_conv_g*_b`` stacks of 3 RCUs are exactly one output RCU plus the next
block's two RCUs on that path, or the two extra final RCUs), convolutions have no bias except
the first conv of each RCU and the classifier, and dropout 0.5 (``dropout_rate``) is applied to
the layer3 and layer4 features and before the classifier. Bilinear resizes use half-pixel
centres (the reference aligns corners).

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import RESNETS
from flaxseg.models.base import SegmentationModel
from flaxseg.models.layers import Dtype, check_at_least, resize_bilinear

CRP_STAGES = 4
# PyTorch's default Conv2d init (kaiming_uniform, a=√5: U(±1/√fan_in)), which the reference
# ports leave on RefineNet's own convolutions. These sit in BN-free residual sums (RCUs, four
# chained CRP stages per block, cascaded over four blocks): He init there makes the logits'
# std ~1e5 at initialisation even with a batch-normalised backbone, this init about 1.
TORCH_DEFAULT_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv3x3(features: int, use_bias: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
    return nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=use_bias,
        kernel_init=TORCH_DEFAULT_CONV_INIT,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ResidualConvUnit(nn.Module):
    """RCU: x + conv(relu(conv(relu(x)))), channels preserved. [B, H, W, C] -> same."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        y = _conv3x3(c, True, self.dtype, self.param_dtype, "conv1")(nn.relu(x))
        y = _conv3x3(c, False, self.dtype, self.param_dtype, "conv2")(nn.relu(y))
        return x + y


class ChainedResidualPooling(nn.Module):
    """CRP: sum of x and ``stages`` chained (5×5 stride-1 max-pool, 3×3 conv) outputs."""

    stages: int = CRP_STAGES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        path = x
        for stage in range(self.stages):
            # Padding is -inf (reduce_window's max identity), like PyTorch's MaxPool2d(5, 1, 2).
            path = nn.max_pool(path, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2)))
            path = _conv3x3(x.shape[-1], False, self.dtype, self.param_dtype, f"conv{stage + 1}")(
                path
            )
            x = x + path
        return x


class RefineNetBlock(nn.Module):
    """One RefineNet block on 1 or 2 input paths -> [B, H_max, W_max, features].

    ``paths`` are ordered from the highest resolution; the first sets the output size.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, paths: list[jax.Array]) -> jax.Array:
        rcu = functools.partial(ResidualConvUnit, self.dtype, self.param_dtype)
        adapted = [
            rcu(name=f"path{i}_rcu2")(rcu(name=f"path{i}_rcu1")(x)) for i, x in enumerate(paths)
        ]
        if len(adapted) == 1:
            x = adapted[0]
        else:
            size = adapted[0].shape[1:3]
            x = sum(
                resize_bilinear(
                    _conv3x3(self.features, False, self.dtype, self.param_dtype, f"path{i}_fusion")(
                        y
                    ),
                    size,
                )
                for i, y in enumerate(adapted)
            )
        x = ChainedResidualPooling(CRP_STAGES, self.dtype, self.param_dtype, name="crp")(nn.relu(x))
        return rcu(name="output_rcu")(x)


class RefineNet(SegmentationModel):
    """4-cascaded multi-path RefineNet.

    Attributes:
      num_classes: output channels of the logits.
      backbone: 'resnet50', 'resnet101' (the paper's) or 'resnet152'.
      base_width: the ResNet's width knob (64 = standard).
      features: width of RefineNet-1..3 (256 in the paper); RefineNet-4 uses twice as many.
      dropout_rate: dropout on layer3/layer4 features and before the classifier (reference
        code: 0.5). ``train=True`` needs ``rngs={'dropout': key}`` and
        ``mutable=['batch_stats']`` (the ResNet's BatchNorm).
    """

    TITLE = "RefineNet"
    BACKBONES = tuple(RESNETS)

    backbone: str = "resnet101"
    base_width: int = 64
    features: int = 256
    dropout_rate: float = 0.5

    def check_arguments(self) -> None:
        check_at_least("features", self.features)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        stages = self.create_backbone()(images, train)
        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        x = None
        for block, stride in ((4, 32), (3, 16), (2, 8), (1, 4)):  # RefineNet-k on stage k
            width = 2 * self.features if stride == 32 else self.features
            features = stages[stride]
            if stride >= 16:
                features = dropout(features)
            features = _conv3x3(width, False, self.dtype, self.param_dtype, f"dimred{block}")(
                features
            )
            paths = [features] if x is None else [features, x]
            x = RefineNetBlock(width, self.dtype, self.param_dtype, name=f"refinenet{block}")(paths)
        for i in range(2):
            x = ResidualConvUnit(self.dtype, self.param_dtype, name=f"final_rcu{i + 1}")(x)
        logits = _conv3x3(self.num_classes, True, self.dtype, self.param_dtype, "classifier")(
            dropout(x)
        )
        return self.finish(logits, images)
