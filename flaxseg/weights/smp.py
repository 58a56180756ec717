"""Whole segmentation_models_pytorch models: a model class's ``SMP_TWIN`` (``heads.SMPTwin``:
smp's class name, the keyword arguments it builds, its decoder's key map) and the encoder's 'smp'
key map say everything; this module applies them."""

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxseg import models
from flaxseg.models import backbones, create_model
from flaxseg.models.heads import SMP_NEUTRAL_KWARGS, SMPTwin
from flaxseg.models.layers import KeyMap, prefix_key_map
from flaxseg.weights.convert import convert_state_dict, plain, to_flax_layout, variable_shapes
from flaxseg.weights.io import WeightsError, as_state_dict, describe_source


def smp_twins() -> dict[str, SMPTwin]:
    """{flaxseg model name: its ``SMP_TWIN``} of the registered models that have one."""
    twins = {name: models.model_class(name).SMP_TWIN for name in models.list_models()}
    return {name: twin for name, twin in twins.items() if twin is not None}


def _smp_arch(model_name: str) -> str:
    """The flaxseg model name of smp's class ``model_name`` (or of flaxseg's own name)."""
    twins = smp_twins()
    for name, twin in twins.items():
        if model_name.lower() in (name, twin.name.lower()):
            return name
    raise WeightsError(
        f"Unknown smp model {model_name!r}; supported: "
        f"{', '.join(twin.name for twin in twins.values())}."
    )


def _smp_encoder(encoder_name: str) -> str:
    if encoder_name not in backbones.names("smp"):
        raise WeightsError(
            f"Unknown smp encoder {encoder_name!r} for convert_smp; supported: "
            f"{', '.join(backbones.names('smp'))}."
        )
    return encoder_name


def _smp_encoder_key_map(encoder: str) -> KeyMap:
    return prefix_key_map(backbones.key_map(encoder, "smp"), ("backbone",), "encoder.")


def _smp_model_kwargs(twin: SMPTwin, smp_kwargs: dict[str, Any]) -> dict[str, Any]:
    """flaxseg constructor arguments for smp's keyword arguments (one sentence for the rest)."""
    smp_kwargs = dict(smp_kwargs)
    for name, default in SMP_NEUTRAL_KWARGS.items():
        value = smp_kwargs.pop(name, default)
        if default != "any" and value != default:
            raise WeightsError(
                f"convert_smp builds models that return logits without smp's classification "
                f"head; {name}={value!r} is not supported (leave it at {default!r})."
            )
    unknown = sorted(set(smp_kwargs) - set(twin.kwargs))
    if unknown:
        raise WeightsError(
            f"convert_smp does not support smp's {', '.join(unknown)} for {twin.name}; "
            f"supported: {', '.join(twin.kwargs + tuple(SMP_NEUTRAL_KWARGS))}."
        )
    try:
        return twin.model_kwargs(smp_kwargs)
    except ValueError as err:  # a value the twin cannot build, in one sentence
        raise WeightsError(str(err)) from err


def _encoder_keys(state_dict: Mapping[str, Any], encoder: str | None = None) -> set[str]:
    """The ``encoder.*`` keys of ``state_dict``; with ``encoder``, those smp's encoder of that
    name uses (its EfficientNets keep their classifier head's conv and BN, which no feature
    uses)."""
    head = ()
    if encoder is not None:
        head = tuple(f"encoder.{prefix}" for prefix in backbones.get(encoder).head_key_prefixes)
    return {
        k
        for k in state_dict
        if k.startswith("encoder.")
        and not k.endswith("num_batches_tracked")
        and not k.startswith(head)
    }


def _smp_encoder_of(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """The smp encoder (``backbones.names("smp")``) whose keys and shapes the ``encoder.*`` part of
    ``state_dict`` holds (the stem's input channels aside), or None."""
    for encoder in backbones.names("smp"):
        key_map = _smp_encoder_key_map(encoder)
        if set(key_map.values()) != _encoder_keys(state_dict, encoder):
            continue
        shapes = traverse_util.flatten_dict(plain(variable_shapes(backbones.create(encoder))))
        stem_key = next(key for path, key in key_map.items() if path[-1] == "kernel")
        if all(
            key == stem_key or to_flax_layout(state_dict[key], shape).shape == shape
            for path, key in key_map.items()
            for shape in [tuple(shapes[(path[0], *path[2:])].shape)]
        ):
            return encoder
    return None


def _smp_arch_of(state_dict: Mapping[str, Any]) -> str | None:
    """The smp architecture (flaxseg model name) whose decoder keys ``state_dict`` holds, or
    None."""
    for arch, twin in smp_twins().items():
        if any(k.startswith(twin.decoder_prefix) for k in state_dict):
            return arch
    return None


def convert_smp(
    model_name: str,
    encoder_name: str,
    state_dict: Mapping[str, Any] | str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    **smp_kwargs: Any,
):
    """Build the flaxseg twin of a segmentation_models_pytorch model and convert its weights.

    ``model_name``: smp's class name or flaxseg's ('Unet'/'unet', 'DeepLabV3', 'DeepLabV3Plus',
    'PSPNet': the registered models with an ``SMP_TWIN``); ``encoder_name``: smp's (a
    registered encoder with an 'smp' key map, ``backbones.names('smp')``: 'resnet34', ...). The
    model is
    ``create_model('unet', backbone=encoder_name)`` (smp's U-Net) or, for the others,
    ``head='smp'``. ``state_dict``: the whole smp model's ``state_dict()`` as a mapping or a
    ``.pth``/``.safetensors`` file. ``smp_kwargs``: the keyword arguments the smp model was built
    with, where they differ from smp's defaults and change the network (``decoder_channels``,
    ``encoder_output_stride``, ``decoder_atrous_rates``, ``decoder_aspp_separable``,
    ``encoder_depth``, ``psp_out_channels``, ``decoder_use_norm``; ``encoder_weights`` and
    ``upsampling`` are ignored; PSPNet takes the ResNet encoders). ``classes`` and
    ``in_channels`` are read from the state dict (when given they must agree with it). smp
    builds its whole encoder even where ``encoder_depth`` stops it early (PSPNet: layer2), and
    its EfficientNets keep a classifier conv; those unused entries are dropped.

    Returns ``(model, variables)``: ``model.apply(variables, images)`` (NHWC) gives smp's
    logits (NCHW there). A state dict of another smp encoder or architecture raises one
    ``WeightsError``.
    """
    arch, encoder = _smp_arch(model_name), _smp_encoder(encoder_name)
    twins = smp_twins()
    source = describe_source(state_dict)
    state_dict = as_state_dict(state_dict)
    if not _encoder_keys(state_dict) or "segmentation_head.0.weight" not in state_dict:
        raise WeightsError(
            f"{source} has no 'encoder.*' and 'segmentation_head.0.weight' entries, so it is "
            f"not the state dict of a segmentation_models_pytorch model."
        )
    found_arch = _smp_arch_of(state_dict)
    if found_arch is not None and found_arch != arch:
        raise WeightsError(
            f"{source} holds an smp {twins[found_arch].name}, not {twins[arch].name}; pass "
            f"model_name={twins[found_arch].name!r}."
        )
    encoder_map = _smp_encoder_key_map(encoder)
    if _encoder_keys(state_dict, encoder) != set(encoder_map.values()):
        _refuse_other_encoder(state_dict, source, encoder)

    stem_key = next(key for path, key in encoder_map.items() if path[-1] == "kernel")
    in_channels = smp_kwargs.pop("in_channels", None) or int(state_dict[stem_key].shape[1])
    num_classes = smp_kwargs.pop("classes", None) or int(
        state_dict["segmentation_head.0.weight"].shape[0]
    )
    model = create_model(
        arch,
        num_classes=num_classes,
        backbone=encoder,
        in_channels=in_channels,
        dtype=dtype,
        **_smp_model_kwargs(twins[arch], smp_kwargs),
    )
    target = variable_shapes(model)
    flat_target = traverse_util.flatten_dict(plain(target))
    # smp builds its whole encoder; stages past encoder_depth (PSPNet) and an EfficientNet's
    # classifier head have no twin here.
    unbuilt = {key for path, key in encoder_map.items() if path not in flat_target}
    unbuilt |= _encoder_keys(state_dict) - _encoder_keys(state_dict, encoder)
    key_map = {path: key for path, key in encoder_map.items() if key not in unbuilt}
    key_map.update(twins[arch].key_map(model))
    try:
        variables = convert_state_dict(
            {k: v for k, v in state_dict.items() if k not in unbuilt},
            key_map,
            target,
            source=source,
            expected=f"smp's {twins[arch].name}({encoder_name!r}) with {smp_kwargs or 'defaults'}",
        )
    except WeightsError as err:
        _refuse_other_encoder(state_dict, source, encoder, err)
        raise
    return model, variables


def _refuse_other_encoder(
    state_dict: Mapping[str, Any], source: str, encoder: str, err: Exception | None = None
) -> None:
    """One sentence when ``state_dict`` holds another smp encoder than ``encoder``; without
    ``err`` (the keys already differ) also when it holds none that flaxseg knows."""
    found = _smp_encoder_of(state_dict)
    if found is not None and found != encoder:
        raise WeightsError(
            f"{source} holds an smp model with encoder {found!r}, not {encoder!r}; pass "
            f"encoder_name={found!r}."
        ) from err
    if err is None and found is None:
        raise WeightsError(
            f"{source}'s 'encoder.*' entries are not smp's {encoder!r} encoder, nor any other "
            f"of {', '.join(backbones.names('smp'))}."
        )
