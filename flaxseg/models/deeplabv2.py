"""DeepLab v2 (Chen, Papandreou, Kokkinos, Murphy & Yuille, "DeepLab: Semantic Image
Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully Connected CRFs",
TPAMI 2017).

Dilated ResNet-101 at output stride 8 → ASPP-L (Sec. 3.3, Fig. 7): four parallel 3×3 atrous
convs with rates 6, 12, 18 and 24, each producing class scores directly, summed → bilinear
upsampling to the input size. (The fully connected CRF is post-processing, outside the model.)

Multi-scale inputs (Sec. 4.1, "MSC"): with ``input_scales=(1.0, 0.75, 0.5)`` the same network
(shared weights) runs on the image resized by each factor (Caffe's Interp size, (n − 1)·s + 1);
the score maps are resized to the full-scale map and fused by taking the per-pixel maximum,
which is the output. For training the paper puts a cross-entropy loss on each scale's scores as
well as on the fused ones: each scale's logits are sown as auxiliary logits
(``layers.sow_aux_logits``, entries ``scale_100``, ``scale_75``, ``scale_50``), so the training
loop adds ``aux_loss_weight`` × their losses (1.0 reproduces the paper's equal weighting).

BatchNorm with several scales: the shared backbone's running statistics are updated once per
training step, from the full-scale pass (the others normalise with their own batch statistics
but leave the running averages alone), not once per scale. ``frozen_batchnorm=True`` is the
released Caffe nets' choice instead: statistics fixed, never updated.

Rates are given at output stride 8 and scale with it (halved at 16); ``output_stride`` changes
no parameter shape. Shapes: [B, H, W, 3] -> [B, H, W, num_classes] float32 logits.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import DILATED
from flaxseg.models.base import SegmentationModel
from flaxseg.models.heads import scale_atrous_rates
from flaxseg.models.layers import (
    Dtype,
    call_without_batch_stats_update,
    resize_bilinear,
    sow_aux_logits,
)


class ASPPL(nn.Module):
    """ASPP-L: sum of 3×3 atrous convs (with bias) to class scores, one per rate.

    [B, H, W, C] -> [B, H, W, num_classes]. Weights start from N(0, 0.01²) as in the reference
    prototxt.
    """

    num_classes: int
    atrous_rates: Sequence[int] = (6, 12, 18, 24)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scores = []
        for i, rate in enumerate(self.atrous_rates):
            scores.append(
                nn.Conv(
                    self.num_classes,
                    (3, 3),
                    padding=((rate, rate), (rate, rate)),
                    kernel_dilation=(rate, rate),
                    kernel_init=nn.initializers.normal(0.01),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"branches_{i}",
                )(x)
            )
        return sum(scores[1:], scores[0])


def scaled_size(size: int, scale: float) -> int:
    """Caffe Interp's size for a shrink by ``scale``: (n − 1)·scale + 1 (321 -> 241, 161)."""
    return int((size - 1) * scale) + 1


class DeepLabV2(SegmentationModel):
    """DeepLab v2 (see the module docstring).

    Attributes:
      num_classes: output channels.
      backbone: 'resnet101' (the paper's), 'resnet50', 'resnet152' or 'xception65'.
      output_stride: 8 (the paper's), 16 or 32.
      atrous_rates: ASPP-L rates at output stride 8.
      input_scales: (1.0,) for one scale, (1.0, 0.75, 0.5) for the paper's MSC; the first must
        be 1.0.
      frozen_batchnorm: the backbone's BatchNorm always normalises with its running statistics
        and never updates them, in training too (the released Caffe nets'
        ``use_global_stats: true``). Freezing BN's scale/offset is the optimiser's job.
      base_width: backbone width knob (64 = the paper's).
    ``train=True`` needs ``mutable=['batch_stats']`` (plus ``'aux'`` with several scales).
    """

    TITLE = "DeepLab v2"
    BACKBONES = DILATED

    backbone: str = "resnet101"
    output_stride: int = 8
    atrous_rates: tuple[int, ...] = (6, 12, 18, 24)
    input_scales: tuple[float, ...] = (1.0,)
    frozen_batchnorm: bool = False
    base_width: int = 64

    def check_arguments(self) -> None:
        scales = tuple(self.input_scales)
        if not scales or scales[0] != 1.0 or any(not 0 < s <= 1 for s in scales):
            raise ValueError(
                f"input_scales must start with 1.0 and hold factors in (0, 1], e.g. "
                f"(1.0, 0.75, 0.5); got {scales!r}."
            )

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, output_stride: int | None = None
    ) -> jax.Array:
        output_stride = self.resolve_output_stride(output_stride)
        # One backbone and one head, called once per scale: the scales share every weight.
        backbone = self.create_backbone(output_stride=output_stride)
        head = ASPPL(
            self.num_classes,
            scale_atrous_rates(self.atrous_rates, 8, output_stride),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="aspp",
        )
        # The backbone has no dropout: in eval mode its BatchNorm is exactly Caffe's
        # use_global_stats.
        backbone_train = train and not self.frozen_batchnorm
        height, width = images.shape[1:3]
        images = images.astype(self.dtype)

        fused = None
        for index, scale in enumerate(self.input_scales):
            scaled = resize_bilinear(
                images, (scaled_size(height, scale), scaled_size(width, scale))
            )
            # The BN running statistics move once per step, from the full-scale pass; the
            # other scales still normalise with their own batch statistics.
            if index == 0:
                features = backbone(scaled, backbone_train)
            else:
                features = call_without_batch_stats_update(backbone, scaled, backbone_train)
            scores = head(features[32])
            if len(self.input_scales) > 1:
                sow_aux_logits(self, f"scale_{round(100 * scale)}", scores, (height, width))
            if fused is None:
                fused = scores
            else:
                fused = jnp.maximum(fused, resize_bilinear(scores, fused.shape[1:3]))
        return self.finish(fused, images)
