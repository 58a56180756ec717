"""Per-model training defaults.

Fields that differ between architectures (learning rate, auxiliary-loss weight) are left unset
(None) in default.py; `resolve(config)` fills them from here for `config.model`, unless the user set
them (a flag or --config.<field>). The train step never knows which model it trains.
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
    "deeplabv2": {"lr": 0.00025},  # Chen et al. 2017 (poly, power 0.9)
    "deeplabv3": {"lr": 0.007},
    "deeplabv3plus": {"lr": 0.007},
    "pspnet": {"lr": 0.01, "aux_loss_weight": 0.4},
    "refinenet": {"lr": 0.005},
    "segnet": {"lr": 0.01},
    "unet": {"lr": 0.01},
}


def defaults_for(model: str) -> dict:
    return {**COMMON, **MODEL_DEFAULTS.get(model, {})}


def resolve(config):
    """Returns a copy of `config` with every unset model-dependent field filled for config.model."""
    config = copy.deepcopy(config)
    for field, value in defaults_for(config.model).items():
        if config[field] is None:
            config[field] = value
    return config
