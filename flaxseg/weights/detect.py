"""Which network a state dict belongs to: the registered encoders' fingerprints
(``backbones.Encoder.fingerprint``), under torchvision's segmentation heads where present."""

from collections.abc import Mapping
from typing import Any

from flaxseg.models import backbones

# torchvision's segmentation models keep their encoder under 'backbone.'; their heads' keys.
_TORCHVISION_HEADS = (
    ("deeplabv3_", ("classifier.0.convs.0.0.weight",)),
    ("fcn_", ("classifier.4.weight", "classifier.1.running_mean")),
)


def detect_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """Best guess of the network a state dict belongs to ('resnet101', 'deeplabv3_resnet50',
    'vgg16_bn', 'xception65', ...), or None."""
    prefix, head = "", ""
    if any(k.startswith("backbone.") for k in state_dict):
        prefix = "backbone."
        head = next(
            (name for name, keys in _TORCHVISION_HEADS if all(k in state_dict for k in keys)), ""
        )
    inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    for encoder in backbones.encoders():
        found = encoder.fingerprint(inner) if encoder.fingerprint is not None else None
        if found:
            return head + found
    return None
