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

from flaxseg.models.backbones import RESNETS
from flaxseg.models.backbones.resnet import torchvision_resnet_key_map
from flaxseg.models.base import SegmentationModel
from flaxseg.models.heads import FCNHead, torchvision_fcn_head_key_map
from flaxseg.models.layers import KeyMap, prefix_key_map


class FCNResNet(SegmentationModel):
    """torchvision's FCN-ResNet (see the module docstring).

    Attributes:
      num_classes: output channels.
      backbone: 'resnet50', 'resnet101' or 'resnet152'.
      output_stride: 8 (torchvision's), 16 or 32; changes no parameter shape.
      aux_head: auxiliary FCNHead on the stride-16 features.
      base_width: ResNet width knob (64 = torchvision's).
    """

    TITLE = "FCN-ResNet"
    BACKBONES = tuple(RESNETS)

    backbone: str = "resnet50"
    output_stride: int = 8
    aux_head: bool = False
    base_width: int = 64

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, output_stride: int | None = None
    ) -> jax.Array:
        features = self.create_backbone(output_stride=self.resolve_output_stride(output_stride))(
            images, train
        )
        x = FCNHead(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(
            features[32], train
        )
        if self.aux_head:
            self.sow_aux_head(features[16], images, train)
        return self.finish(x, images)


def torchvision_fcn_resnet_key_map(depth: int = 50, aux_head: bool = False) -> KeyMap:
    """Flax paths of ``FCNResNet(backbone=f'resnet{depth}')`` -> keys of torchvision's
    ``fcn_resnet<depth>`` state dict (``aux_classifier.*`` with ``aux_head``)."""
    key_map = prefix_key_map(torchvision_resnet_key_map(depth), ("backbone",), "backbone.")
    key_map.update(torchvision_fcn_head_key_map(("head",), "classifier"))
    if aux_head:
        key_map.update(torchvision_fcn_head_key_map(("aux_head",), "aux_classifier"))
    return key_map
