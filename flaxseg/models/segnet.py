"""SegNet (Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation", TPAMI 2017).

Encoder: the 13 convolutions of VGG16-BN (3×3 conv + BatchNorm + ReLU, blocks of 2, 2, 3, 3, 3,
widths 64·(1, 2, 4, 8, 8)), each block closed by a 2×2 stride-2 max-pool that also returns its
argmax indices. Decoder: the mirror image, as in the reference Caffe net (``segnet_train``):
each decoder block first max-unpools with the indices of its encoder block (nothing learned;
values go back where their maxima were, zeros elsewhere) to that block's exact size, then runs
as many conv+BN+ReLU as the encoder block had, the last one narrowing to the next block's
width:

  unpool5 → 512, 512, 512 → unpool4 → 512, 512, 256 → unpool3 → 256, 256, 128
  → unpool2 → 128, 64 → unpool1 → 64 → classifier (3×3 conv to num_classes, no BN/ReLU).

The per-pixel softmax of the paper lives in the loss. Choices:
  - Encoder modules mirror torchvision's ``vgg16_bn().features`` (``encoder/features_<i>``), so
    ImageNet weights load with ``flaxseg.weights.load_pretrained_backbone`` (the paper's own
    initialisation); like torchvision and the reference Caffe net, convolutions keep their bias
    before BatchNorm.
  - Pools round up by default (``ceil_mode=True``, Caffe's pooling, which the reference used):
    any H, W ≥ 1 works and the last row/column of an odd map keeps its own maximum. With
    ``ceil_mode=False`` (PyTorch's default) inputs need H, W ≥ 32 and unpooling restores the
    dropped rows as zeros. Either way every decoder block gets its encoder block's exact size.

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.vgg import (
    VGG16_BLOCK_DEPTHS,
    VGG16_WIDTH_MULTIPLIERS,
    conv_layout,
    conv_relu,
)
from flaxseg.models.base import PretrainedBackbone, SegmentationModel
from flaxseg.models.layers import ConvBNAct, Dtype, check_at_least, check_rate, he_normal_fan_out
from flaxseg.models.pooling import max_pool_with_indices, max_unpool

CENTRAL_BLOCK = 2  # Bayesian SegNet's dropout acts on blocks 3, 4, 5 (indices 2, 3, 4)


class SegNetEncoder(nn.Module):
    """VGG16-BN convolutions with index-returning pools, named like torchvision's ``features``.

    Returns ``(x, pools)``: the pool5 map [B, ⌈H/32⌉, ⌈W/32⌉, 8·base_width] (floor with
    ``ceil_mode=False``) and, per block from the first, ``(pre-pool spatial size, indices)``.
    ``dropout_rate`` > 0 drops the pooled outputs of blocks 3-5 (Bayesian SegNet).
    """

    base_width: int = 64
    ceil_mode: bool = True
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        pools = []
        for block, (convs, mult) in enumerate(
            zip(conv_layout(batchnorm=True), VGG16_WIDTH_MULTIPLIERS)
        ):
            for index in convs:
                x = conv_relu(
                    x,
                    index,
                    self.base_width * mult,
                    batchnorm=True,
                    train=train,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                )
            size = x.shape[1:3]
            x, indices = max_pool_with_indices(x, 2, ceil_mode=self.ceil_mode)
            pools.append((size, indices))
            if block >= CENTRAL_BLOCK:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return x, pools


class SegNet(SegmentationModel):
    """SegNet with a VGG16-BN encoder and an index-unpooling decoder.

    Attributes:
      num_classes: output channels of the logits.
      backbone: 'vgg16_bn' (the paper's encoder; the only one).
      base_width: width of the first block (64 = the paper's); all widths scale with it.
      ceil_mode: round pooled sizes up (Caffe, default) or down (PyTorch); see the module doc.
      dropout_rate: Bayesian SegNet's dropout (Kendall, Badrinarayanan & Cipolla, BMVC 2017,
        which uses 0.5) on the central blocks: after the pools of encoder blocks 3-5 and after
        decoder blocks 5-3. 0 (default) is plain SegNet.
      dtype: compute dtype; parameters stay ``param_dtype``.
    ``train=True`` needs ``mutable=['batch_stats']`` (and ``rngs={'dropout': key}`` with
    dropout).
    """

    TITLE = "SegNet"
    BACKBONES = ("vgg16_bn",)

    backbone: str = "vgg16_bn"
    base_width: int = 64
    ceil_mode: bool = True
    dropout_rate: float = 0.0

    def check_arguments(self) -> None:
        check_at_least("base_width", self.base_width)
        check_rate("dropout_rate", self.dropout_rate)

    def pretrained_backbone(self) -> PretrainedBackbone:
        return PretrainedBackbone(self.backbone, path=("encoder",))

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x, pools = SegNetEncoder(
            self.base_width,
            self.ceil_mode,
            self.dropout_rate,
            self.dtype,
            self.param_dtype,
            name="encoder",
        )(images.astype(self.dtype), train)
        widths = [self.base_width * m for m in VGG16_WIDTH_MULTIPLIERS]
        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        for block in reversed(range(len(VGG16_BLOCK_DEPTHS))):
            size, indices = pools[block]
            x = max_unpool(x, indices, size)
            depth = VGG16_BLOCK_DEPTHS[block]
            for conv in reversed(range(1, depth + 1)):  # Caffe names: conv<b>_<depth..1>_D
                if block == 0 and conv == 1:
                    break  # conv1_1_D is the classifier below
                narrowing = conv == 1
                features = widths[block - 1] if narrowing else widths[block]
                x = ConvBNAct(
                    features,
                    3,
                    use_bias=True,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"conv{block + 1}_{conv}_D",
                )(x, train)
            if block >= CENTRAL_BLOCK:
                x = dropout(x)
        logits = nn.Conv(
            self.num_classes,
            (3, 3),
            padding=((1, 1), (1, 1)),
            kernel_init=he_normal_fan_out(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(x)
        assert logits.shape[1:3] == images.shape[1:3], (logits.shape, images.shape)
        return self.finish(logits, images)
