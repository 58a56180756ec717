"""flaxseg models: a registry of semantic-segmentation architectures (flax.linen modules).

    from flaxseg import models
    models.list_models()
    # ['deeplabv1', 'deeplabv2', 'deeplabv3', 'deeplabv3plus', 'fcn16s', 'fcn32s', 'fcn8s',
    #  'fcn_resnet', 'pspnet', 'refinenet', 'segnet', 'unet']
    model = models.create_model('fcn8s', num_classes=21, backbone='vgg16', dtype=jnp.bfloat16)
    variables = model.init(rng, jnp.zeros((1, H, W, 3)), train=False)
    logits = model.apply(variables, images, train=False)   # [B, H, W, num_classes] float32

Every model is a ``base.SegmentationModel`` (shared argument checks, output stride, backbone
construction from ``backbones.create``, final resize and cast, auxiliary head, and
``pretrained_backbone()``, which says what ``flaxseg.weights.load_pretrained_backbone`` can
initialise). Adding an architecture is one file and one line of the registry below.

Contract shared by every model:
  - NHWC float images of any H, W; logits come back float32 at exactly the input's H, W.
  - ``in_channels`` (default 3) is the images' channel count, e.g.
    ``create_model('unet', num_classes=2, in_channels=1)``; images of another count are
    refused in one sentence. Pretrained RGB weights are adapted to it as smp does
    (``flaxseg.weights.adapt_first_conv``).
  - Parameters are float32; ``dtype`` is the compute dtype.
  - ``train=True`` needs ``rngs={'dropout': key}`` where the model has dropout and
    ``mutable=['batch_stats']`` where it has BatchNorm.
  - Auxiliary heads (e.g. PSPNet's stage-3 head) sow their logits, already at the input's
    H×W and float32, into the ``'aux'`` collection (``layers.AUX_COLLECTION``, via
    ``layers.sow_aux_logits``). The training loop applies with
    ``mutable=['batch_stats', 'aux']`` and adds ``aux_loss_weight × cross-entropy`` for every
    leaf of the returned ``'aux'`` collection (each leaf is one [B, H, W, num_classes] array);
    evaluation applies without ``'aux'`` mutable. ``init`` also records the collection: keep
    only 'params' and 'batch_stats' from initialised variables. Models without aux heads sow
    nothing.

The registry below is the single list of architectures; tests walk all of it.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from flaxseg.models import (
    deeplabv1,
    deeplabv2,
    deeplabv3,
    deeplabv3plus,
    fcn,
    fcn_resnet,
    pspnet,
    refinenet,
    segnet,
    unet,
)
from flaxseg.models.layers import check_choice

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "fcn32s": fcn.FCN32s,
    "fcn16s": fcn.FCN16s,
    "fcn8s": fcn.FCN8s,
    "segnet": segnet.SegNet,
    "unet": unet.UNet,
    "pspnet": pspnet.PSPNet,
    "refinenet": refinenet.RefineNet,
    "deeplabv1": deeplabv1.DeepLabV1,
    "deeplabv2": deeplabv2.DeepLabV2,
    "deeplabv3": deeplabv3.DeepLabV3,
    "deeplabv3plus": deeplabv3plus.DeepLabV3Plus,
    # torchvision's fcn_resnet50/101 (dilated ResNet + FCNHead), for its checkpoints.
    "fcn_resnet": fcn_resnet.FCNResNet,
}


def list_models() -> list[str]:
    """Sorted names accepted by ``create_model``."""
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    num_classes: int,
    backbone: str = "",
    kwargs: Mapping[str, Any] | None = None,
    **more: Any,
) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs.

    ``backbone`` ('' = the model's default), the ``kwargs`` mapping and ``more`` go to the
    model's constructor (``dtype``, width knobs, ...), so a training config's model group
    builds with ``create_model(**config.model, num_classes=21)``.
    """
    check_choice(name, list_models(), "model")
    kwargs = {**(kwargs or {}), **more}
    if backbone:
        kwargs["backbone"] = backbone
    constructor = _MODELS[name]
    module_class = getattr(constructor, "func", constructor)  # registry entries may be partials
    accepted = {field.name for field in dataclasses.fields(module_class)} - {"parent", "name"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"Model {name!r} does not take {', '.join(unknown)}; its arguments are: "
            f"{', '.join(sorted(accepted - {'num_classes'}))}."
        )
    return constructor(num_classes=num_classes, **kwargs)


def model_class(name: str) -> type[nn.Module]:
    """The module class ``create_model(name, ...)`` builds (its class attributes: ``TITLE``,
    ``encoder_needs``, ``SMP_TWIN``, ...)."""
    check_choice(name, list_models(), "model")
    constructor = _MODELS[name]
    return getattr(constructor, "func", constructor)


def count_params(variables_or_shapes: Mapping[str, Any]) -> int:
    """Number of scalars in the ``'params'`` collection of variables (or of their eval_shape).

    A bare params tree (no ``'params'`` key) is counted whole.
    """
    params = variables_or_shapes.get("params", variables_or_shapes)
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(params)))


__all__ = ["count_params", "create_model", "list_models", "model_class"]
