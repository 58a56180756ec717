"""FCN on a dilated ResNet, exactly torchvision's ``fcn_resnet50`` / ``fcn_resnet101``.

Not the FCN of Long et al. (see ``fcn.py`` for FCN-32s/16s/8s on VGG): this is the "FCN"
baseline of torchvision's segmentation zoo — a ResNet with layer3/layer4 strides replaced by
dilation (output stride 8), torchvision's FCNHead (3×3 conv to C/4 + BN + ReLU, dropout 0.1,
1×1 classifier) and bilinear upsampling to the input size; ``aux_head=True`` adds the same head
on layer3 (stride 16), sown as auxiliary logits (``layers.sow_aux_logits``). It exists so that
torchvision's checkpoints convert one to one (``flaxseg.weights.convert_torchvision``).

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.dilated import RESNET_DEPTHS, make_dilated_backbone
from flaxseg.models.backbones.resnet import torchvision_resnet_key_map
from flaxseg.models.heads import FCNHead, torchvision_fcn_head_key_map
from flaxseg.models.layers import (Dtype, check_at_least, check_choice, check_output_stride,
                                   resize_bilinear, sow_aux_logits)


class FCNResNet(nn.Module):
    """torchvision's FCN-ResNet (see the module docstring).

    Attributes:
      num_classes: output channels.
      backbone: 'resnet50', 'resnet101' or 'resnet152'.
      output_stride: 8 (torchvision's), 16 or 32; changes no parameter shape.
      aux_head: auxiliary FCNHead on the stride-16 features.
      base_width: ResNet width knob (64 = torchvision's).
    """

    num_classes: int
    backbone: str = "resnet50"
    output_stride: int = 8
    aux_head: bool = False
    base_width: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_choice(self.backbone, tuple(RESNET_DEPTHS), "backbone", "FCN-ResNet")
        check_output_stride(self.output_stride)
        check_at_least("num_classes", self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 output_stride: int | None = None) -> jax.Array:
        output_stride = output_stride or self.output_stride
        check_output_stride(output_stride)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features = make_dilated_backbone(self.backbone, output_stride=output_stride,
                                         multi_grid=(1, 1, 1), base_width=self.base_width,
                                         name="backbone", **kw)(images, train)
        size = images.shape[1:3]
        x = FCNHead(self.num_classes, name="head", **kw)(features[32], train)
        if self.aux_head:
            aux = FCNHead(self.num_classes, name="aux_head", **kw)(features[16], train)
            sow_aux_logits(self, "aux_logits", aux, size)
        return resize_bilinear(x, size).astype(jnp.float32)


def torchvision_fcn_resnet_key_map(depth: int = 50,
                                   aux_head: bool = False) -> dict[tuple[str, ...], str]:
    """Flax paths of ``FCNResNet(backbone=f'resnet{depth}')`` -> keys of torchvision's
    ``fcn_resnet<depth>`` state dict (``aux_classifier.*`` with ``aux_head``)."""
    key_map = {(path[0], "backbone", *path[1:]): f"backbone.{key}"
               for path, key in torchvision_resnet_key_map(depth).items()}
    key_map.update(torchvision_fcn_head_key_map(("head",), "classifier"))
    if aux_head:
        key_map.update(torchvision_fcn_head_key_map(("aux_head",), "aux_classifier"))
    return key_map
