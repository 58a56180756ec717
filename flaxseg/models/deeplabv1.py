"""DeepLab v1, LargeFOV variant (Chen, Papandreou, Kokkinos, Murphy & Yuille, "Semantic Image
Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015).

VGG-16 with pool4 and pool5 turned into 3×3 stride-1 (pad 1) pools and conv5 dilated by 2, so
the score map has output stride 8 (Sec. 3.1, the "hole" algorithm); then the LargeFOV head
(Table 2): fc6 = 3×3 conv with rate 12 and 1024 channels, fc7 = 1×1 conv 1024, each with ReLU
and dropout 0.5, and fc8 = 1×1 conv to the classes; the scores are upsampled bilinearly to the
input size (Sec. 3.2). The fully connected CRF is post-processing, outside the model.

ImageNet VGG-16 weights initialise conv1–conv5 and, decimated to 3×3×1024 as in the paper,
fc6/fc7 (``flaxseg.weights.load_pretrained_backbone``). ``output_stride`` 16 or 32 keeps more
of VGG's pooling (and scales fc6's rate to keep its field of view); 8 is the paper's.

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.vgg import VGG16
from flaxseg.models.heads import scale_atrous_rates
from flaxseg.models.layers import (Dtype, check_at_least, check_choice, check_output_stride,
                                   resize_bilinear)

BACKBONES = ("vgg16", "vgg16_bn")


class DeepLabV1(nn.Module):
    """DeepLab-LargeFOV (see the module docstring).

    Attributes:
      num_classes: output channels.
      backbone: 'vgg16' (the paper's) or 'vgg16_bn'.
      output_stride: 8 (the paper's), 16 or 32; changes no parameter shape.
      fc6_rate: fc6's atrous rate at output stride 8 (12 = LargeFOV).
      fc_channels: width of fc6/fc7 (1024 = LargeFOV).
      dropout_rate: dropout after fc6 and fc7; ``train=True`` needs ``rngs={'dropout': key}``.
      base_width: VGG width knob (64 = the paper's).
    """

    num_classes: int
    backbone: str = "vgg16"
    output_stride: int = 8
    fc6_rate: int = 12
    fc_channels: int = 1024
    dropout_rate: float = 0.5
    base_width: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_choice(self.backbone, BACKBONES, "backbone", "DeepLab v1")
        check_output_stride(self.output_stride)
        check_at_least("num_classes", self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 output_stride: int | None = None) -> jax.Array:
        output_stride = output_stride or self.output_stride
        check_output_stride(output_stride)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features = VGG16(base_width=self.base_width, batchnorm=self.backbone == "vgg16_bn",
                         output_stride=output_stride, name="backbone", **kw)(
                             images.astype(self.dtype), train)
        (rate,) = scale_atrous_rates((self.fc6_rate,), 8, output_stride)
        x = nn.Conv(self.fc_channels, (3, 3), padding=((rate, rate), (rate, rate)),
                    kernel_dilation=(rate, rate), name="fc6", **kw)(features[32])
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        x = nn.Conv(self.fc_channels, (1, 1), name="fc7", **kw)(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        # fc8 starts from N(0, 0.01²) as in the reference prototxt.
        x = nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01),
                    name="fc8", **kw)(x)
        return resize_bilinear(x, images.shape[1:3]).astype(jnp.float32)
