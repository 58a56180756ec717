"""DeepLab v1, LargeFOV variant (Chen, Papandreou, Kokkinos, Murphy & Yuille, "Semantic Image
Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015).

As the released ``DeepLab-LargeFOV/train.prototxt`` (deeplab-public, voc12) wires VGG-16:
pool1–pool3 are 3×3 stride-2 pad-1 max-pools (Caffe rounds up: 513 px -> 257, 129, 65), pool4
and pool5 3×3 stride-1 pad-1 max-pools, conv5 dilated by 2 (the "hole" algorithm, Sec. 3.1),
so the score map has output stride 8; then ``pool5a``, a 3×3 stride-1 pad-1 average pool
(Caffe divides by the full 9 cells, zero padding included), and the LargeFOV head (Table 2):
fc6 = 3×3 conv with rate 12 and 1024 channels, fc7 = 1×1 conv 1024, each with ReLU and dropout
0.5, fc8 = 1×1 conv to the classes; the scores are upsampled bilinearly to the input size
(Sec. 3.2). The fully connected CRF is post-processing, outside the model.

``pooling='floor'`` keeps torchvision's classification VGG instead (2×2 pools rounding down,
no ``pool5a``): the same parameters with another geometry. ImageNet VGG-16 weights initialise
conv1–conv5 and, decimated to 3×3×1024 as in the paper, fc6/fc7
(``flaxseg.weights.load_pretrained_backbone``). ``output_stride`` 16 or 32 keeps more of the
strided pools (and scales fc6's rate to keep its field of view); 8 is the paper's.

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

import flax.linen as nn
import jax

from flaxseg.models.backbones import VGGS
from flaxseg.models.base import PretrainedBackbone, SegmentationModel
from flaxseg.models.heads import scale_atrous_rates
from flaxseg.models.layers import avg_pool, check_one_of

POOLINGS = ("deeplab", "floor")


class DeepLabV1(SegmentationModel):
    """DeepLab-LargeFOV (see the module docstring).

    Attributes:
      num_classes: output channels.
      backbone: 'vgg16' (the paper's) or 'vgg16_bn'.
      output_stride: 8 (the paper's), 16 or 32; changes no parameter shape.
      pooling: 'deeplab' (the released prototxt's pools and pool5a) or 'floor' (torchvision's).
      fc6_rate: fc6's atrous rate at output stride 8 (12 = LargeFOV).
      fc_channels: width of fc6/fc7 (1024 = LargeFOV).
      dropout_rate: dropout after fc6 and fc7; ``train=True`` needs ``rngs={'dropout': key}``.
      base_width: VGG width knob (64 = the paper's).
    """

    TITLE = "DeepLab v1"
    BACKBONES = VGGS

    backbone: str = "vgg16"
    output_stride: int = 8
    pooling: str = "deeplab"
    fc6_rate: int = 12
    fc_channels: int = 1024
    dropout_rate: float = 0.5
    base_width: int = 64

    def check_arguments(self) -> None:
        check_one_of("DeepLab v1 pooling", self.pooling, POOLINGS)

    def pretrained_backbone(self) -> PretrainedBackbone:
        return PretrainedBackbone(self.backbone, fc_layers=("fc6", "fc7"))

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, output_stride: int | None = None
    ) -> jax.Array:
        output_stride = self.resolve_output_stride(output_stride)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = self.create_backbone(output_stride=output_stride, pooling=self.pooling)(
            images.astype(self.dtype), train
        )[32]
        if self.pooling == "deeplab":
            x = avg_pool(x, 3, 1, padding=1)  # pool5a
        (rate,) = scale_atrous_rates((self.fc6_rate,), 8, output_stride)
        x = nn.Conv(
            self.fc_channels,
            (3, 3),
            padding=((rate, rate), (rate, rate)),
            kernel_dilation=(rate, rate),
            name="fc6",
            **kw,
        )(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        x = nn.Conv(self.fc_channels, (1, 1), name="fc7", **kw)(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        # fc8 starts from N(0, 0.01²) as in the reference prototxt.
        x = nn.Conv(
            self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01), name="fc8", **kw
        )(x)
        return self.finish(x, images)
