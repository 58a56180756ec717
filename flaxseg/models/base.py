"""The skeleton every flaxseg model shares, so that a model file only wires backbone, head and
decoder (as torchvision's ``_SimpleSegmentationModel`` and smp's ``SegmentationModel`` do).

``SegmentationModel`` holds the fields every model has (``num_classes``, ``in_channels``,
``dtype``, ``param_dtype``) and does, once for all of them:
  - argument checks at construction: ``backbone`` against what the model needs of its encoder
    (``encoder_needs()``: the strides it reads, the output strides it dilates to, ...; any
    registered encoder that gives them) or the names of ``BACKBONES`` (its own networks, e.g.
    U-Net's 'unet', or one family's), ``output_stride`` where the model has one,
    ``num_classes`` ≥ 1, ``in_channels`` ≥ 1, then the model's own ``check_arguments()``;
  - the input check: every subclass's ``__call__`` first checks that the images are NHWC with
    ``in_channels`` channels (``check_images``; wrapped in by ``__init_subclass__``, so no model
    file has to remember it and none can skip it);
  - ``resolve_output_stride(output_stride)``: the apply-time override, else the constructor's;
  - ``create_backbone(...)``: ``backbones.create`` with the model's backbone, width, dtypes,
    ``remat`` and (EfficientNet) ``drop_path_rate``, named ``backbone``;
  - ``finish(logits, images)``: bilinear resize to the input's H×W and float32 cast (the score
    map itself inside ``layers.score_map_outputs()``, for losses at its resolution);
  - ``sow_aux_head(...)``: the auxiliary FCN head whose logits go to the ``'aux'`` collection;
  - ``pretrained_backbone()``: which ImageNet network initialises the model and where it sits,
    which ``flaxseg.weights.load_pretrained_backbone`` asks instead of guessing from names.
"""

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models import backbones
from flaxseg.models.backbones import Needs
from flaxseg.models.heads import FCNHead, SMPTwin
from flaxseg.models.layers import (
    Dtype,
    KeyMap,
    batch_norm_momentum,
    check_at_least,
    check_choice,
    check_output_stride,
    check_rate,
    prefix_key_map,
    resize_bilinear,
    returns_score_maps,
    sow_aux_logits,
)


@dataclasses.dataclass(frozen=True)
class PretrainedBackbone:
    """Where a model keeps the ImageNet network that pretrained weights initialise.

    Attributes:
      name: a registered encoder's name ('resnet101', 'vgg16_bn', 'xception65').
      path: module path of the backbone in the model's variables (('backbone',), ('encoder',)).
      deep_stem: a ResNet with the three-conv stem (MMSegmentation's v1c keys).
      num_middle_units: Xception-65's middle-flow depth.
      fc_layers: the model's convs that take the classifier's fc6/fc7 (FCN, DeepLab v1).
    """

    name: str
    path: tuple[str, ...] = ("backbone",)
    deep_stem: bool = False
    num_middle_units: int = 16
    fc_layers: tuple[str, ...] = ()

    def key_map(self) -> KeyMap:
        """{model variable path: key of the PyTorch backbone's state dict}."""
        keys = prefix_key_map(
            backbones.key_map(
                self.name, deep_stem=self.deep_stem, num_middle_units=self.num_middle_units
            ),
            self.path,
        )
        if self.fc_layers:
            keys.update(backbones.fc_key_map(self.name, self.fc_layers))
        return keys


class SegmentationModel(nn.Module):
    """Base of every registered model: [B, H, W, in_channels] images -> [B, H, W, num_classes]
    float32.

    Subclasses declare their fields (all with defaults, including ``backbone``), set ``TITLE``
    (the name errors use) and ``ENCODER_NEEDS`` (what they need of an encoder; or override
    ``encoder_needs()`` where it depends on a field) and/or ``BACKBONES`` (backbone names they
    take besides: their own networks, or one family's), and write ``__call__(self, images,
    ...)``. A model that is an smp architecture's twin sets ``SMP_TWIN``.

    ``in_channels`` (default 3, RGB) is the images' channel count; the first convolution takes
    its input width from it. Pretrained RGB weights are adapted to it by
    ``flaxseg.weights.adapt_first_conv`` (as segmentation_models_pytorch does).

    ``remat`` (default False) rematerialises the backbone's repeated units in the backward pass
    (``backbones.create(..., remat=True)``): less device memory for about one more forward pass
    of the backbone. It changes no variable, so checkpoints trained with and without it are
    interchangeable; backbones without repeated units (VGG, AlexNet, U-Net's own path) ignore it.

    ``bn_momentum`` (default None: each layer's own, PyTorch's 0.9 or an EfficientNet flavour's)
    is the running-statistics momentum of every BatchNorm in the model, backbone and heads
    (flax's convention, the weight of the old value, as TF's ``batch_norm_decay``: TF DeepLab
    v3/v3+ train with 0.9997). It changes no variable (``layers.batch_norm_momentum``).

    ``drop_path_rate`` (default 0: off) is an EfficientNet encoder's stochastic depth (timm's
    ``drop_path_rate``; smp's EfficientNet encoders train with 0.2): block i of N drops its
    residual branch with probability rate·i/N in training, and ``train=True`` then needs
    ``rngs={'dropout': key}`` (the train step gives one). Other backbones refuse it.
    """

    TITLE: ClassVar[str] = "model"
    BACKBONES: ClassVar[tuple[str, ...]] = ()
    ENCODER_NEEDS: ClassVar[Needs | None] = None
    SMP_TWIN: ClassVar[SMPTwin | None] = None

    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    in_channels: int = 3
    remat: bool = False
    bn_momentum: float | None = None
    drop_path_rate: float = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Wrapped before flax wraps its methods, so that init and apply both check the images.
        call = cls.__dict__.get("__call__")
        if call is not None:

            @functools.wraps(call)
            def checked_call(self, images, *args, **kwargs):
                self.check_images(images)
                with batch_norm_momentum(self.bn_momentum):
                    return call(self, images, *args, **kwargs)

            cls.__call__ = checked_call
        super().__init_subclass__(**kwargs)

    def __post_init__(self):
        self.check_arguments()
        needs = self.encoder_needs()
        if needs is not None and self.backbone in backbones.names():
            if self.backbone not in self.BACKBONES:
                backbones.check_needs(self.backbone, needs, self.TITLE)
        else:
            check_choice(self.backbone, self.valid_backbones(), "backbone", self.TITLE)
        if getattr(self, "output_stride", None) is not None:
            check_output_stride(self.output_stride)
        check_at_least("num_classes", self.num_classes)
        check_at_least("in_channels", self.in_channels)
        if self.bn_momentum is not None:
            check_rate("bn_momentum", self.bn_momentum)
        check_rate("drop_path_rate", self.drop_path_rate)
        if self.drop_path_rate and not (
            self.backbone in backbones.names() and backbones.get(self.backbone).drop_path
        ):
            takes = [encoder.name for encoder in backbones.encoders() if encoder.drop_path]
            example = f", such as {takes[-1]!r}" if takes else ""
            raise ValueError(
                f"drop_path_rate (stochastic depth) needs an encoder that has it ("
                f"{len(takes)} registered ones do{example}); {self.TITLE} with "
                f"backbone {self.backbone!r} has none: leave it at 0."
            )
        super().__post_init__()

    def check_images(self, images: jax.Array) -> None:
        """One sentence for images that are not [B, H, W, in_channels] (checked at trace time)."""
        shape = tuple(getattr(images, "shape", ()))
        if len(shape) != 4 or shape[-1] != self.in_channels:
            hint = (
                f"; build the model with in_channels={shape[-1]} or give it "
                f"{self.in_channels}-channel images"
                if len(shape) == 4
                else ""
            )
            raise ValueError(
                f"{self.TITLE} with in_channels={self.in_channels} expects NHWC images of shape "
                f"[batch, height, width, {self.in_channels}], got shape {shape}{hint}."
            )

    def check_arguments(self) -> None:
        """The model's own argument checks (run before the shared ones)."""

    def encoder_needs(self) -> Needs | None:
        """What the model needs of an encoder (None: it takes only ``BACKBONES``)."""
        return self.ENCODER_NEEDS

    def valid_backbones(self) -> tuple[str, ...]:
        """``BACKBONES`` and every registered encoder that meets ``encoder_needs()``."""
        needs = self.encoder_needs()
        able = () if needs is None else backbones.able(needs)
        return self.BACKBONES + tuple(name for name in able if name not in self.BACKBONES)

    def resolve_output_stride(self, output_stride: int | None, default: int = 32) -> int:
        """The ``output_stride`` given to ``apply`` if any, else the constructor's, else
        ``default``; checked."""
        output_stride = output_stride or getattr(self, "output_stride", None) or default
        check_output_stride(output_stride)
        return output_stride

    def create_backbone(self, **kwargs: Any) -> nn.Module:
        """``backbones.create(self.backbone, ...)`` named 'backbone', in the model's dtypes,
        ``base_width`` and ``remat``; ``kwargs`` (``output_stride``, ``multi_grid``, ...) go to
        ``create``."""
        kwargs = {"base_width": getattr(self, "base_width", 64), "remat": self.remat, **kwargs}
        if self.drop_path_rate:  # the encoder's stochastic depth (checked at construction)
            kwargs["drop_path_rate"] = self.drop_path_rate
        return backbones.create(
            self.backbone, dtype=self.dtype, param_dtype=self.param_dtype, name="backbone", **kwargs
        )

    def finish(self, logits: jax.Array, images: jax.Array) -> jax.Array:
        """The model's output: ``logits`` resized bilinearly to the images' H×W, float32
        (inside ``layers.score_map_outputs()``: not resized)."""
        if returns_score_maps():
            return logits.astype(jnp.float32)
        return resize_bilinear(logits, images.shape[1:3]).astype(jnp.float32)

    def sow_aux_head(
        self,
        features: jax.Array,
        images: jax.Array,
        train: bool,
        entry: str = "aux_logits",
        **head_kwargs: Any,
    ) -> None:
        """Auxiliary ``FCNHead`` named ``aux_head`` on ``features`` (deep supervision); its
        logits go to the ``'aux'`` collection as ``entry``, at the images' size
        (``layers.sow_aux_logits``). ``head_kwargs`` go to ``FCNHead``."""
        logits = FCNHead(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="aux_head",
            **head_kwargs,
        )(features, train)
        sow_aux_logits(self, entry, logits, images.shape[1:3])

    def pretrained_backbone(self) -> PretrainedBackbone | None:
        """The ImageNet network pretrained weights initialise, and where; None when the model
        has none (e.g. U-Net's own contracting path)."""
        return PretrainedBackbone(self.backbone) if self.backbone in backbones.names() else None
