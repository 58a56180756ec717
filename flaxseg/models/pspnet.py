"""PSPNet (Zhao, Shi, Qi, Wang & Jia, "Pyramid Scene Parsing Network", CVPR 2017).

Backbone: dilated ResNet-50/101/152 with the deep stem (three 3×3 convs), output stride 8
(layer3 and layer4 dilated 2 and 4), from ``backbones/resnet.py``.

Pyramid pooling module on layer4's C channels: for each bin count b in (1, 2, 3, 6), adaptive
average pooling to b×b (PyTorch's ``AdaptiveAvgPool2d`` bins, which overlap when b does not
divide the map), 1×1 conv to C/4 + BN + ReLU, bilinear upsampling back to the map's size; the
four results are concatenated with the map itself (2C channels), then 3×3 conv 512 + BN + ReLU,
dropout 0.1 and a 1×1 classifier, upsampled bilinearly to the input.

Auxiliary head (deep supervision, paper Sec. 3.4, loss weight 0.4 in the training config) on
layer3: 3×3 conv 256 + BN + ReLU, dropout 0.1, 1×1 classifier. It is built at init and run only
when ``train=True``; its logits are sown through ``layers.sow_aux_logits`` as
``aux['layer3']`` of the returned mutable collections, float32 at the input's size.

Bilinear resizes use half-pixel centres (``align_corners=False``, MMSegmentation's choice;
the Caffe original's Interp layer aligns corners).

``head='smp'`` is segmentation_models_pytorch's ``PSPNet`` (smp 0.6.0), a lighter network:
the encoder (7×7 stem, no dilation) runs only to ``encoder_depth`` (3: layer2, stride 8, smp's
default); pyramid pooling with bins (1, 2, 3, 6) to C/4 channels each (1×1 conv + BN + ReLU; the
1-bin branch has a biased conv and no BN), upsampled bilinearly with ``align_corners=True``
and concatenated before the map; a 1×1 conv to ``head_channels`` (smp's ``psp_out_channels``,
512) + BN + ReLU, channel dropout (``Dropout2d``) 0.2, a 3×3 classifier with bias and
``align_corners=True`` upsampling to the input. No auxiliary head. Its weights convert with
``flaxseg.weights.convert_smp``; its encoders are the ResNets (smp's PSPNet on a light encoder
is not built here). smp refuses inputs that are not multiples of 2^encoder_depth
(where its ×8 upsampling is the resize to the input); this model resizes to the input's H×W at
any size.

Shapes: [B, H, W, 3] normalised images -> [B, H, W, num_classes] float32 logits.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import RESNETS
from flaxseg.models.base import PretrainedBackbone, SegmentationModel
from flaxseg.models.heads import FCNHead, SMPTwin, resize_bilinear_aligned
from flaxseg.models.layers import (
    ConvBNAct,
    Dtype,
    KeyMap,
    check_choice,
    check_one_of,
    check_rate,
    conv_bn_key_map,
    conv_key_map,
    resize_bilinear,
)
from flaxseg.models.pooling import adaptive_avg_pool

HEADS = ("paper", "smp")
ENCODER_DEPTHS = (3, 4, 5)  # smp's encoder_depth: the encoder stops at stride 2^depth


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: [B, h, w, C] -> [B, h, w, C + len(bins)·C/4]."""

    bins: Sequence[int] = (1, 2, 3, 6)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        size = x.shape[1:3]
        reduced = max(1, x.shape[-1] // len(self.bins))
        branches = [x]
        for b in self.bins:
            y = adaptive_avg_pool(x, b)
            y = ConvBNAct(
                reduced, 1, dtype=self.dtype, param_dtype=self.param_dtype, name=f"bin{b}"
            )(y, train)
            branches.append(resize_bilinear(y, size))
        return jnp.concatenate(branches, axis=-1)


class PSPNet(SegmentationModel):
    """PSPNet on a dilated deep-stem ResNet.

    Attributes:
      num_classes: output channels of the logits.
      backbone: 'resnet50', 'resnet101' or 'resnet152'.
      output_stride: 8 (the paper), 16 or 32; changes no parameter shape.
      base_width: the ResNet's width knob (64 = standard); the PPM reduces to C/4 of layer4.
      bins: pyramid bin counts.
      head_channels / aux_channels: widths of the 3×3 convs of the final and auxiliary heads.
      aux_head: whether to build the layer3 auxiliary head (default: with the paper head;
        ``head='smp'`` has none).
      dropout_rate: dropout before both classifiers (default 0.1; ``head='smp'``: 0.2, per
        channel).
      head: 'paper' or 'smp' (see the module docstring).
      encoder_depth: with ``head='smp'``, the encoder's last stage (3: layer2, smp's default).
    ``train=True`` needs ``mutable=['batch_stats']`` (plus ``'aux'`` to collect the auxiliary
    logits) and ``rngs={'dropout': key}``.
    """

    TITLE = "PSPNet"
    # The ResNets: the paper's deep stem, and smp's encoder_depth cut by their layer names.
    BACKBONES = tuple(RESNETS)
    SMP_TWIN = SMPTwin(
        name="PSPNet",
        decoder_prefix="decoder.psp.",
        kwargs=("encoder_depth", "psp_out_channels"),
        model_kwargs=lambda smp_kwargs: smp_pspnet_kwargs(smp_kwargs),
        key_map=lambda model: smp_pspnet_key_map(model),
    )

    backbone: str = "resnet101"
    output_stride: int = 8
    base_width: int = 64
    bins: Sequence[int] = (1, 2, 3, 6)
    head_channels: int = 512
    aux_channels: int = 256
    aux_head: bool | None = None
    dropout_rate: float | None = None
    head: str = "paper"
    encoder_depth: int = 3

    def check_arguments(self) -> None:
        if not self.bins or any(int(b) != b or b < 1 for b in self.bins):
            raise ValueError(f"bins must be positive integers, got {tuple(self.bins)!r}.")
        check_choice(self.head, HEADS, "PSPNet head")
        check_one_of("encoder_depth", self.encoder_depth, ENCODER_DEPTHS)
        if self.head == "smp" and self.aux_head:
            raise ValueError("PSPNet with head='smp' has no auxiliary head; drop aux_head=True.")
        if self.dropout_rate is not None:
            check_rate("dropout_rate", self.dropout_rate)

    def pretrained_backbone(self) -> PretrainedBackbone:
        return PretrainedBackbone(self.backbone, deep_stem=self.head == "paper")

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, output_stride: int | None = None
    ) -> jax.Array:
        if self.head == "smp":
            return self._smp(images, train)
        dropout_rate = 0.1 if self.dropout_rate is None else self.dropout_rate
        features = self.create_backbone(
            output_stride=self.resolve_output_stride(output_stride), deep_stem=True
        )(images, train)
        x = PyramidPooling(tuple(self.bins), self.dtype, self.param_dtype, name="ppm")(
            features[32], train
        )
        head = dict(channels=self.head_channels, dropout_rate=dropout_rate, conv_name="conv")
        logits = FCNHead(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head", **head
        )(x, train)
        # Built at init so the variables exist; run only in training, where its loss is used.
        if self.aux_head is not False and (train or self.is_initializing()):
            self.sow_aux_head(
                features[16],
                images,
                train,
                entry="layer3",
                **{**head, "channels": self.aux_channels},
            )
        return self.finish(logits, images)

    def _smp(self, images: jax.Array, train: bool) -> jax.Array:
        # smp's PSPDecoder + SegmentationHead(kernel_size=3, upsampling=8), on the encoder's
        # stride-2^encoder_depth map.
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        backbone = self.create_backbone()
        with nn.intercept_methods(_stop_after_stage(self.encoder_depth - 1)):
            x = backbone(images, train)[2**self.encoder_depth]
        size, reduced = x.shape[1:3], max(1, x.shape[-1] // len(self.bins))
        branches = []
        for i, b in enumerate(self.bins):
            # smp: "PyTorch does not support BatchNorm for 1x1 shape": the 1-bin conv is biased.
            y = ConvBNAct(reduced, 1, use_bn=b != 1, name=f"psp_{i}", **kw)(
                adaptive_avg_pool(x, b), train
            )
            branches.append(resize_bilinear_aligned(y, size))
        x = jnp.concatenate([*branches, x], axis=-1)
        x = ConvBNAct(self.head_channels, 1, name="psp_conv", **kw)(x, train)
        dropout_rate = 0.2 if self.dropout_rate is None else self.dropout_rate
        x = nn.Dropout(dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
        x = nn.Conv(self.num_classes, (3, 3), padding=1, name="segmentation_head", **kw)(x)
        return resize_bilinear_aligned(x, images.shape[1:3]).astype(jnp.float32)


def _stop_after_stage(last_stage: int):
    # smp's encoder_depth: a ResNet encoder that stops after layer<last_stage>. The deeper
    # stages' units (``layer<k>_<u>`` children of the backbone) are skipped, so they are never
    # built (no variables) nor run; the backbone's deeper feature maps are then unused copies.
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        name = module.name or ""
        if (
            context.method_name == "__call__"
            and module.parent is not None
            and getattr(module.parent, "name", None) == "backbone"
            and name.startswith("layer")
            and int(name[len("layer") : name.index("_")]) > last_stage
        ):
            return args[0]
        return next_fun(*args, **kwargs)

    return intercept


def smp_pspnet_key_map(model: PSPNet) -> KeyMap:
    """Flax paths of a ``PSPNet(head='smp')``'s decoder and head -> keys of smp's ``PSPNet``
    state dict; the encoder's part (``encoder.*``) is the backbone's key map (layer1 ..
    layer<encoder_depth - 1>)."""
    key_map = {}
    for i, b in enumerate(model.bins):
        torch = f"decoder.psp.blocks.{i}.pool.1"
        if b == 1:
            key_map.update(conv_key_map((f"psp_{i}", "conv"), f"{torch}.0", bias=True))
        else:
            key_map.update(conv_bn_key_map((f"psp_{i}",), f"{torch}.0", f"{torch}.1"))
    key_map.update(conv_bn_key_map(("psp_conv",), "decoder.conv.0", "decoder.conv.1"))
    key_map.update(conv_key_map(("segmentation_head",), "segmentation_head.0", bias=True))
    return key_map


def smp_pspnet_kwargs(smp_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``PSPNet(head='smp')`` arguments for smp ``PSPNet``'s keyword arguments."""
    return {
        "head": "smp",
        "encoder_depth": smp_kwargs.get("encoder_depth", 3),
        "head_channels": smp_kwargs.get("psp_out_channels", 512),
    }
