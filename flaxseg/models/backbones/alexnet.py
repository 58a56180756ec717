"""AlexNet (Krizhevsky et al. 2012) in torchvision's single-tower layout.

conv1 11×11 stride 4 (64) → ReLU → 3×3/2 max-pool → conv2 5×5 (192) → ReLU → pool → conv3 3×3
(384) → conv4 (256) → conv5 (256), each with ReLU → pool. Widths scale as
base_width·(1, 3, 6, 4, 4) (64 gives torchvision's). No LRN and no grouped convs (torchvision
dropped both). Conv ``features.<i>`` of torchvision is the flax submodule ``features_<i>``.

FCN-AlexNet (Long et al. 2015) sets ``first_conv_padding=100`` and ``pooling='ceil'`` (Caffe's
rounding) like the Caffe reference; the crop geometry is then the same as Caffe's
voc-fcn-alexnet (offset 18).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.encoder import Encoder
from flaxseg.models.layers import (
    Dtype,
    KeyMap,
    check_one_of,
    conv_key_map,
    he_normal_fan_out,
    max_pool,
)

ALEXNET_WIDTH_MULTIPLIERS = (1, 3, 6, 4, 4)
# (torchvision features index, kernel size, stride, padding) of the five convs.
_ALEXNET_CONVS = ((0, 11, 4, 2), (3, 5, 1, 2), (6, 3, 1, 1), (8, 3, 1, 1), (10, 3, 1, 1))
# Convs followed by a 3×3 stride-2 max-pool, and the stride of that pool's output.
_POOL_STRIDE_AFTER = {0: 8, 3: 16, 10: 32}
# torchvision's ``classifier`` Linear layers fc6 (on the flattened 6×6 pool5) and fc7.
TORCHVISION_FC_LAYERS = ("classifier.1", "classifier.4")


def alexnet_channels(base_width: int = 64) -> dict[int, int]:
    """Channels of each feature map returned by ``AlexNet``, keyed by stride."""
    c1, c2, _, _, c5 = (base_width * m for m in ALEXNET_WIDTH_MULTIPLIERS)
    return {4: c1, 8: c1, 16: c2, 32: c5}


class AlexNet(nn.Module):
    """AlexNet feature extractor returning feature maps keyed by (nominal) stride.

    Input [B, H, W, 3]. Output dict:
      4: conv1 after ReLU (before pool1), 8: pool1, 16: pool2, 32: pool5 (after conv3–5).
    Channel counts are ``out_channels`` (= ``alexnet_channels(base_width)``).
    """

    base_width: int = 64
    first_conv_padding: int = 2
    pooling: str = "floor"  # or 'ceil': pooled sizes round down (torchvision) or up (Caffe)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_one_of("AlexNet pooling", self.pooling, ("floor", "ceil"))
        super().__post_init__()

    @property
    def out_channels(self) -> dict[int, int]:
        return alexnet_channels(self.base_width)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        del train  # no BatchNorm or dropout in the feature extractor
        features = {}
        for (index, k, stride, pad), mult in zip(_ALEXNET_CONVS, ALEXNET_WIDTH_MULTIPLIERS):
            if index == 0:
                pad = self.first_conv_padding
            x = nn.Conv(
                self.base_width * mult,
                (k, k),
                strides=(stride, stride),
                padding=((pad, pad), (pad, pad)),
                kernel_init=he_normal_fan_out(),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"features_{index}",
            )(x)
            x = nn.relu(x)
            if index == 0:
                features[4] = x
            if index in _POOL_STRIDE_AFTER:
                x = max_pool(x, 3, 2, ceil_mode=self.pooling == "ceil")
                features[_POOL_STRIDE_AFTER[index]] = x
        return features


def torchvision_alexnet_key_map() -> KeyMap:
    """Map flax variable paths of ``AlexNet`` to torchvision ``alexnet().features`` keys.

    ``('params', 'features_0', 'kernel') -> 'features.0.weight'`` (OIHW -> HWIO on load), etc.
    """
    key_map = {}
    for index, *_ in _ALEXNET_CONVS:
        key_map.update(conv_key_map((f"features_{index}",), f"features.{index}", bias=True))
    return key_map


def _build(*, output_stride: int = 32, remat: bool = False, **kwargs) -> AlexNet:
    del output_stride, remat  # 32 only (backbones.create checks it); no repeated units
    return AlexNet(**kwargs)


def _fingerprint(state_dict: Mapping[str, Any]) -> str | None:
    # torchvision's features without BatchNorm whose features.2 is a pool (VGG's is a conv).
    keys = state_dict
    plain = "features.0.weight" in keys and "features.1.running_mean" not in keys
    return "alexnet" if plain and "features.2.weight" not in keys else None


ENCODERS = {
    "alexnet": Encoder(
        name="alexnet",
        build=_build,
        channels=alexnet_channels,
        output_strides=(32,),
        key_maps={"torchvision": lambda **_: torchvision_alexnet_key_map()},
        fingerprint=_fingerprint,
        fc_layers=TORCHVISION_FC_LAYERS,
    )
}
