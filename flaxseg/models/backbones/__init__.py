"""Backbones: feature extractors returning ``{stride: feature map}`` plus their channel counts.

Each backbone mirrors torchvision's module layout and exposes a key map from flax variable paths
to torchvision state-dict keys; ``torch_state_dict_to_variables`` applies it.
"""

from flaxseg.models.backbones.alexnet import AlexNet, alexnet_channels, torchvision_alexnet_key_map
from flaxseg.models.backbones.convert import torch_state_dict_to_variables
from flaxseg.models.backbones.vgg import (VGG16, VGG16BN, torchvision_vgg16_key_map,
                                          vgg16_channels)

__all__ = [
    "AlexNet", "VGG16", "VGG16BN", "alexnet_channels", "torch_state_dict_to_variables",
    "torchvision_alexnet_key_map", "torchvision_vgg16_key_map", "vgg16_channels",
]
