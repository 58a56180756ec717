"""Pretrained PyTorch weights (torchvision, timm, MMSegmentation) for flaxseg models.

    from flaxseg import weights
    state_dict = weights.load_state_dict("resnet101-63fe2227.pth")    # {key: np.ndarray}
    model, variables = weights.convert_torchvision("deeplabv3_resnet101", state_dict)
    logits = model.apply(variables, images)          # same predictions as torchvision's model
    # A whole segmentation_models_pytorch model (smp.Unet("resnet34", in_channels=1, ...)):
    model, variables = weights.convert_smp("Unet", "resnet34", "unet_resnet34.safetensors")

    # Start a model's backbone from an ImageNet checkpoint (what train.py --pretrained does):
    variables, report = weights.load_pretrained_backbone(variables, "resnet101-63fe2227.pth",
                                                         model)
    print(report)                                    # what was loaded, what stayed random
    # A model built with in_channels != 3 gets the file's RGB first convolution adapted as
    # segmentation_models_pytorch does (weights.adapt_first_conv: 1 = sum over RGB, more =
    # RGB repeated and scaled by 3 / in_channels).

Files: ``.pth``/``.pt``/``.bin`` need PyTorch (imported only then); ``.safetensors`` needs only
the ``safetensors`` package. Layouts: conv weights OIHW -> HWIO, Linear [out, in] -> Dense
[in, out] (or folded into a k×k conv kernel, e.g. VGG's fc6 as FCN's), BatchNorm weight/bias/
running_mean/running_var -> scale/bias/mean/var; ``num_batches_tracked`` has no counterpart.
Where each tensor goes is the key map ({flax path: torch key}) that each backbone and model
module owns (``flaxseg.models.backbones.key_map``, ``PretrainedBackbone.key_map``, a model's
``SMP_TWIN``, ...); this package is the one converter that applies them, and takes its
architecture tables and state-dict fingerprints from the encoder registry
(``flaxseg.models.backbones``): an encoder registered there converts here.

One module per job:
  io.py                reading state dicts (``load_state_dict``) and ``WeightsError``
  detect.py            which network a state dict is (``detect_architecture``)
  convert.py           the strict converter along a key map (``convert_state_dict``), and
                       any registered encoder from its twin's state dict (``convert_encoder``)
  torchvision_timm.py  torchvision and timm models (``convert_torchvision``, ``convert_timm``)
  smp.py               whole segmentation_models_pytorch models (``convert_smp``)
  pretrained.py        a model's backbone from an ImageNet file (``load_pretrained_backbone``,
                       ``adapt_first_conv``)
A new source (e.g. Hugging Face ``save_pretrained`` directories) is one more module beside
these and one line below.

Every user error (missing or truncated file, wrong architecture, unknown ``arch``) raises one
``WeightsError`` (a ``ValueError``) with one message naming the file or the keys at fault.
"""

from flaxseg.weights.convert import convert_encoder, convert_state_dict
from flaxseg.weights.detect import detect_architecture
from flaxseg.weights.io import WeightsError, load_state_dict
from flaxseg.weights.pretrained import PretrainedReport, adapt_first_conv, load_pretrained_backbone
from flaxseg.weights.smp import convert_smp, smp_twins
from flaxseg.weights.torchvision_timm import (
    convert_timm,
    convert_torchvision,
    timm_archs,
    torchvision_archs,
)

__all__ = [
    "PretrainedReport",
    "WeightsError",
    "adapt_first_conv",
    "convert_encoder",
    "convert_smp",
    "convert_state_dict",
    "convert_timm",
    "convert_torchvision",
    "detect_architecture",
    "load_pretrained_backbone",
    "load_state_dict",
    "smp_twins",
    "timm_archs",
    "torchvision_archs",
]
