"""What an encoder offers (``Encoder``) and what a model asks of one (``Needs``).

Each backbone module exports ``ENCODERS = {name: Encoder(...)}``; ``backbones/__init__.py``
registers them, and ``backbones.register(Encoder(...))`` adds a user's. Models check their
encoder against their ``Needs`` instead of a list of names, and ``flaxseg.weights`` reads its
architecture tables and state-dict fingerprints from the same entries.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from flaxseg.models.layers import KeyMap


@dataclasses.dataclass(frozen=True)
class Encoder:
    """One registered encoder.

    Attributes:
      name: the backbone name models take (``create_model(..., backbone=name)``).
      build: ``build(output_stride=, base_width=, remat=, **options, **module_kwargs)`` -> a
        flax module mapping [B, H, W, C] images to ``{stride: feature map}``. ``options`` are
        ``multi_grid`` (when ``multi_grid`` is not None), ``deep_stem`` (when ``deep_stem``) and
        ``dilation_style`` (when it has more than one); ``module_kwargs`` ``dtype``,
        ``param_dtype``, ``name`` and the module's own keywords. ``base_width`` 64 is the full
        network (the tests build tiny ones with 4 or 8).
      channels: ``channels(base_width)`` -> ``{stride: channels}`` of the features ``build``
        returns; its keys are the strides the encoder gives.
      output_strides: the output strides it can give (below 32 by dilation), parameters unchanged.
      dilation_styles: the rules it trades strides for dilation by, its default first:
        'torchvision' (the first unit of a dilated stage keeps the previous rate), 'smp' (smp's
        ``make_dilated``: every conv of the stage at its rate), 'timm', 'deeplab'. Models that
        equal smp's ask for 'smp'.
      multi_grid: DeepLab v3's default multi-grid of the last stage's units ((1, 2, 4) where it
        has three units, v3 paper Table 3), or None when it takes no ``multi_grid``.
      deep_stem: whether it takes ``deep_stem`` (ResNet's three-conv stem, PSPNet's).
      drop_path: whether ``build`` takes ``drop_path_rate`` (stochastic depth: EfficientNet's,
        and the transformer and ConvNeXt encoders'); models refuse a rate for one that does not.
      key_maps: ``{weight source: fn(**options) -> {flax path: torch key}}`` onto the state dict
        of that source's twin (without any prefix): 'torchvision', 'timm', 'smp' (smp's encoder
        without its ``encoder.`` prefix), ...; the first is the default (the ImageNet network).
        ``options`` are ``deep_stem`` and ``num_middle_units``; a map reads those it needs.
      source_names: the name a source knows it by where that is not ``name`` (timm's
        ``mobilenetv2_100``).
      fingerprint: ``fingerprint(state_dict)`` -> the architecture a state dict (keys without
        prefix) is, if it is one of this encoder's twins ('resnet50', 'resnet50_v1c',
        'mobilenetv2_100'), else None; ``weights.detect_architecture`` asks every encoder.
      head_key_prefixes: torch keys of the twin's classifier head that no feature uses (dropped
        when converting; the ``fc``/``classifier``/``head.fc`` Linear layers always are).
      stem_key_prefixes: torch keys of a stem that a file may hold in another form (ResNet's
        7×7 vs deep stem); a file without them leaves the stem random.
      fc_layers: torch keys of the ImageNet classifier's fc6 and fc7 Linear layers, which FCN
        and DeepLab v1 load into their fc convs.
    """

    name: str
    build: Callable[..., nn.Module]
    channels: Callable[[int], dict[int, int]]
    output_strides: tuple[int, ...] = (8, 16, 32)
    dilation_styles: tuple[str, ...] = ()
    multi_grid: tuple[int, ...] | None = None
    deep_stem: bool = False
    drop_path: bool = False
    key_maps: Mapping[str, Callable[..., KeyMap]] = dataclasses.field(default_factory=dict)
    source_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fingerprint: Callable[[Mapping[str, Any]], str | None] | None = None
    head_key_prefixes: tuple[str, ...] = ()
    stem_key_prefixes: tuple[str, ...] = ()
    fc_layers: tuple[str, ...] = ()

    @property
    def strides(self) -> tuple[int, ...]:
        """The strides of the feature maps it gives."""
        return tuple(sorted(self.channels(64)))

    def source_name(self, source: str) -> str:
        """The name weight ``source`` knows this encoder by."""
        return self.source_names.get(source, self.name)


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a model asks of its encoder.

    Attributes:
      strides: the feature strides it reads (U-Net: 2…32; DeepLab v3+: 4 and 32).
      output_strides: the output strides it dilates the encoder to.
      multi_grid: it sets multi-grid rates (DeepLab v3/v3+ paper heads).
      deep_stem: it builds the three-conv stem (PSPNet).
      dilation_style: the dilation rule it needs ('smp' for the smp-equal heads), or None.
    """

    strides: tuple[int, ...] = (32,)
    output_strides: tuple[int, ...] = ()
    multi_grid: bool = False
    deep_stem: bool = False
    dilation_style: str | None = None

    def unmet(self, encoder: Encoder) -> str | None:
        """The first need ``encoder`` does not meet, as a clause ("cannot give stride 4"), or
        None."""
        for stride in self.strides:
            if stride not in encoder.strides:
                return f"cannot give stride {stride}"
        for output_stride in self.output_strides:
            if output_stride not in encoder.output_strides:
                return f"cannot give output stride {output_stride}"
        if self.multi_grid and encoder.multi_grid is None:
            return "takes no multi-grid"
        if self.deep_stem and not encoder.deep_stem:
            return "has no deep stem"
        if self.dilation_style and self.dilation_style not in encoder.dilation_styles:
            return f"cannot dilate {self.dilation_style}'s way"
        return None
