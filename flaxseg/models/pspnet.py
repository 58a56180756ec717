"""PSPNet (Zhao, Shi, Qi, Wang & Jia, "Pyramid Scene Parsing Network", CVPR 2017).

Backbone: dilated ResNet-50/101/152 with the deep stem (three 3×3 convs), output stride 8
(layer3 and layer4 dilated 2 and 4), from ``backbones/resnet.py``.

Pyramid pooling module on layer4's C channels: for each bin count b in (1, 2, 3, 6), adaptive
average pooling to b×b (PyTorch's ``AdaptiveAvgPool2d`` bins, which overlap when b does not
divide the map), 1×1 conv to C/4 + BN + ReLU, bilinear upsampling back to the map's size; the
four results are concatenated with the map itself (2C channels), then 3×3 conv 512 + BN + ReLU,
dropout 0.1 and a 1×1 classifier, upsampled bilinearly to the input.

Auxiliary head (deep supervision, paper Sec. 3.4, loss weight 0.4 in the training config) on
layer3: 3×3 conv 256 + BN + ReLU, dropout 0.1, 1×1 classifier. It is built at init and run only
when ``train=True``; its logits are sown through ``layers.sow_aux_logits`` as
``aux['layer3']`` of the returned mutable collections, float32 at the input's size.

Bilinear resizes use half-pixel centres (``align_corners=False``, MMSegmentation's choice;
the Caffe original's Interp layer aligns corners). Shapes: [B, H, W, 3] normalised images ->
[B, H, W, num_classes] float32 logits.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import RESNETS
from flaxseg.models.base import PretrainedBackbone, SegmentationModel
from flaxseg.models.heads import FCNHead
from flaxseg.models.layers import ConvBNAct, Dtype, resize_bilinear
from flaxseg.models.pooling import adaptive_avg_pool


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: [B, h, w, C] -> [B, h, w, C + len(bins)·C/4]."""

    bins: Sequence[int] = (1, 2, 3, 6)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        size = x.shape[1:3]
        reduced = max(1, x.shape[-1] // len(self.bins))
        branches = [x]
        for b in self.bins:
            y = adaptive_avg_pool(x, b)
            y = ConvBNAct(
                reduced, 1, dtype=self.dtype, param_dtype=self.param_dtype, name=f"bin{b}"
            )(y, train)
            branches.append(resize_bilinear(y, size))
        return jnp.concatenate(branches, axis=-1)


class PSPNet(SegmentationModel):
    """PSPNet on a dilated deep-stem ResNet.

    Attributes:
      num_classes: output channels of the logits.
      backbone: 'resnet50', 'resnet101' or 'resnet152'.
      output_stride: 8 (the paper), 16 or 32; changes no parameter shape.
      base_width: the ResNet's width knob (64 = standard); the PPM reduces to C/4 of layer4.
      bins: pyramid bin counts.
      head_channels / aux_channels: widths of the 3×3 convs of the final and auxiliary heads.
      aux_head: whether to build the layer3 auxiliary head.
      dropout_rate: dropout before both classifiers.
    ``train=True`` needs ``mutable=['batch_stats']`` (plus ``'aux'`` to collect the auxiliary
    logits) and ``rngs={'dropout': key}``.
    """

    TITLE = "PSPNet"
    BACKBONES = tuple(RESNETS)

    backbone: str = "resnet101"
    output_stride: int = 8
    base_width: int = 64
    bins: Sequence[int] = (1, 2, 3, 6)
    head_channels: int = 512
    aux_channels: int = 256
    aux_head: bool = True
    dropout_rate: float = 0.1

    def check_arguments(self) -> None:
        if not self.bins or any(int(b) != b or b < 1 for b in self.bins):
            raise ValueError(f"bins must be positive integers, got {tuple(self.bins)!r}.")

    def pretrained_backbone(self) -> PretrainedBackbone:
        return PretrainedBackbone(self.backbone, deep_stem=True)

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, output_stride: int | None = None
    ) -> jax.Array:
        features = self.create_backbone(
            output_stride=self.resolve_output_stride(output_stride), deep_stem=True
        )(images, train)
        x = PyramidPooling(tuple(self.bins), self.dtype, self.param_dtype, name="ppm")(
            features[32], train
        )
        head = dict(channels=self.head_channels, dropout_rate=self.dropout_rate, conv_name="conv")
        logits = FCNHead(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head", **head
        )(x, train)
        # Built at init so the variables exist; run only in training, where its loss is used.
        if self.aux_head and (train or self.is_initializing()):
            self.sow_aux_head(
                features[16],
                images,
                train,
                entry="layer3",
                **{**head, "channels": self.aux_channels},
            )
        return self.finish(logits, images)
