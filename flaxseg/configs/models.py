"""Per-model training defaults.

Fields that differ between architectures (learning rate, auxiliary-loss weight) are left unset
(None) in default.py; `resolve(config)` fills them from here for `config.model.name` (and its
arguments, `config.model.kwargs`), unless the user or a recipe set them. The train step never
knows which model it trains.
"""

import copy

# Used for every model unless its entry says otherwise.
COMMON = {"lr": 0.007, "aux_loss_weight": 0.4}

MODEL_DEFAULTS = {
    # FCN (Long et al.): SGD momentum 0.99 with a tiny lr on an un-normalised loss; with our
    # per-pixel mean loss and momentum 0.9 the DeepLab-style 0.01 is the equivalent scale.
    "fcn32s": {"lr": 0.01},
    "fcn16s": {"lr": 0.01},
    "fcn8s": {"lr": 0.01},
    "deeplabv1": {"lr": 0.001},  # Chen et al. 2015
    # Chen et al. 2017 (poly, power 0.9); MSC's per-scale losses weigh as much as the fused one.
    "deeplabv2": {"lr": 0.00025, "aux_loss_weight": 1.0},
    "deeplabv3": {"lr": 0.007},
    "deeplabv3plus": {"lr": 0.007},
    "pspnet": {"lr": 0.01, "aux_loss_weight": 0.4},  # Zhao et al. 2017, hszhao/semseg
    "refinenet": {"lr": 0.005},
    "segnet": {"lr": 0.01},
    "unet": {"lr": 0.01},
    # torchvision's reference recipe (references/segmentation): aux loss weight 0.5.
    "fcn_resnet": {"aux_loss_weight": 0.5},
}
# Model arguments that switch to another reference's defaults.
KWARG_DEFAULTS = {("deeplabv3", "head", "torchvision"): {"aux_loss_weight": 0.5}}


def defaults_for(model: str, model_kwargs: dict | None = None) -> dict:
    defaults = {**COMMON, **MODEL_DEFAULTS.get(model, {})}
    for (name, key, value), extra in KWARG_DEFAULTS.items():
        if name == model and (model_kwargs or {}).get(key) == value:
            defaults.update(extra)
    return defaults


def resolve(config):
    """Returns a copy of `config` with every unset model-dependent field filled for config.model."""
    config = copy.deepcopy(config)
    for field, value in defaults_for(config.model.name, dict(config.model.kwargs)).items():
        if config[field] is None:
            config[field] = value
    return config
