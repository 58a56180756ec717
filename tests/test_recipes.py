"""Every paper recipe in flaxseg/configs/ trains 3 steps on the synthetic set, with its optimiser
groups asserted (which parameters are frozen, ×10, decayed).

The recipes run as written except for what makes them small: tiny widths through the same
``--model_kwargs`` merge train.py uses, ResNet-18 instead of ResNet-101 (depth, not width,
dominates compile time), 48 px crops, batch 2, 3 steps.
"""

import importlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_models
from flax import traverse_util

from flaxseg.serving.restore import build_model
from flaxseg.training import cli, loop, optim, spec
from flaxseg.training.sharding import create_mesh, shard_batch

pytestmark = pytest.mark.slow  # trains every paper recipe

RECIPES = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "flaxseg" / "configs").glob("*_voc.py")
)
TINY = {
    name: {k: v for k, v in kw.items() if k != "backbone"}
    for name, kw in tiny_models.TINY_KWARGS.items()
}
TINY["deeplabv3plus_xception65"] = dict(
    base_width=4, num_middle_units=2, aspp_channels=8, low_level_channels=4, decoder_channels=8
)


def recipe_config(recipe: str, data_dir: str):
    config = importlib.import_module(f"flaxseg.configs.{recipe}").get_config()
    backbone = config.model.backbone.replace("resnet101", "resnet18")
    tiny = TINY.get(f"{config.model.name}_{backbone}", TINY[config.model.name])
    config = cli.apply_overrides(
        config,
        {
            "model_kwargs": json.dumps(tiny),
            "backbone": backbone,
            "dataset": "synthetic",
            "data_dir": data_dir,
            "crop_size": 48,
            "batch_size": 2,
            "steps": 3,
        },
    )
    config.eval_batch_size = 2
    config.progress_bar = False
    return spec.resolve_config(config)


def test_every_recipe_is_listed():
    assert RECIPES == sorted(
        [
            "deeplabv1_largefov_voc",
            "deeplabv2_voc",
            "deeplabv3_voc",
            "deeplabv3plus_voc",
            "fcn16s_voc",
            "fcn32s_voc",
            "fcn8s_voc",
            "pspnet_voc",
            "refinenet_voc",
            "segnet_voc",
            "unet_voc",
        ]
    )


def _expect_groups(recipe, groups, config):
    """What each recipe's paper says about its parameters, checked leaf by leaf."""
    wd = config.weight_decay

    def select(predicate):
        chosen = {name: g for name, g in groups.items() if predicate(name)}
        assert chosen, f"{recipe}: no parameter matched"
        return chosen

    def assert_all(chosen, lr_mult, weight_decay):
        for name, group in chosen.items():
            assert (group["lr_mult"], group["weight_decay"]) == (lr_mult, weight_decay), name

    if recipe.startswith("fcn"):
        assert_all(select(lambda n: n.startswith("upscore")), 0.0, 0.0)
        assert_all(select(lambda n: n.endswith("/bias")), 2.0, 0.0)
        assert_all(select(lambda n: n.endswith("kernel") and not n.startswith("upscore")), 1.0, wd)
        assert wd == pytest.approx(5e-4 / (500 * 375))  # Caffe's lr·wd (test_recipe_corrections)
    elif recipe == "deeplabv1_largefov_voc":
        assert groups["fc8/kernel"] == {"lr_mult": 10.0, "weight_decay": wd, "rule": 0}
        assert groups["fc8/bias"]["lr_mult"] == 20.0 and groups["fc8/bias"]["weight_decay"] == 0
        assert_all(select(lambda n: n.endswith("/bias") and not n.startswith("fc8")), 2.0, 0.0)
        assert_all(select(lambda n: n.endswith("/kernel") and not n.startswith("fc8")), 1.0, wd)
        assert wd == 5e-4
    elif recipe == "deeplabv2_voc":
        bn = select(
            lambda n: n.startswith("backbone/") and n.rsplit("/", 1)[1] in ("scale", "bias")
        )
        assert_all(bn, 0.0, 0.0)
        assert_all(select(lambda n: n.startswith("aspp/") and n.endswith("kernel")), 10.0, wd)
        assert_all(select(lambda n: n.startswith("aspp/") and n.endswith("bias")), 20.0, 0.0)
        assert_all(select(lambda n: n.startswith("backbone/") and n.endswith("kernel")), 1.0, wd)
    elif recipe == "deeplabv3plus_voc":
        assert_all(select(lambda n: "conv_dw/kernel" in n), 1.0, 0.0)
        assert_all(select(lambda n: n.endswith("kernel") and "conv_dw" not in n), 1.0, wd)
        assert wd == 4e-5
    elif recipe == "pspnet_voc":  # semseg decays every parameter, biases and BN included
        assert_all(select(lambda n: n.split("/")[0] in ("ppm", "head", "aux_head")), 10.0, wd)
        assert_all(select(lambda n: n.startswith("backbone/")), 1.0, wd)
    elif recipe == "refinenet_voc":
        assert_all(
            select(lambda n: not n.startswith("backbone/") and n.endswith("kernel")), 10.0, wd
        )
        assert_all(select(lambda n: n.startswith("backbone/") and n.endswith("kernel")), 1.0, wd)
    elif recipe == "segnet_voc":  # conv biases ×2 undecayed, BN scale decayed, BN shift not
        assert_all(select(lambda n: n.endswith(("conv/bias", "classifier/bias"))), 2.0, 0.0)
        assert_all(select(lambda n: n.endswith("bn/scale")), 1.0, wd)
        assert_all(select(lambda n: n.endswith("bn/bias")), 1.0, 0.0)
    else:  # deeplabv3_voc, unet_voc: one group, decay on kernels only
        assert_all(select(lambda n: n.endswith("kernel")), 1.0, wd)
        assert_all(select(lambda n: not n.endswith("kernel")), 1.0, 0.0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_three_steps_with_its_parameter_groups(recipe, data_dir):
    config = recipe_config(recipe, data_dir)
    spec.validate_config(config)
    mesh = create_mesh()
    model = build_model(spec.model_spec(config))
    tx, _ = loop.create_optimizer(config)
    state = loop.init_state(model, tx, config, mesh)
    groups = optim.param_groups(state.params, config.param_groups, config.weight_decay)
    _expect_groups(recipe, groups, config)

    start = jax.device_get(state.params), jax.device_get(state.batch_stats)
    train_step = loop.jit_train_step(config, mesh)
    iterator = loop.inputs.create_train_iterator(config)
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, shard_batch(next(iterator), mesh), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses
    assert config.loss.split("+")[0] in metrics
    params = jax.device_get(state.params)
    flat_start = {"/".join(k): v for k, v in traverse_util.flatten_dict(start[0]).items()}
    flat_end = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    frozen = [name for name, group in groups.items() if group["lr_mult"] == 0]
    for name in frozen:  # bit-identical after the steps
        assert np.array_equal(flat_start[name], flat_end[name]), name
    # The others train (a few may move by less than float32 resolves in 3 small steps).
    moved = [
        n for n in groups if n not in frozen and not np.array_equal(flat_start[n], flat_end[n])
    ]
    assert len(moved) >= 0.5 * (len(groups) - len(frozen)), (len(moved), len(groups), len(frozen))
    if recipe == "deeplabv2_voc":  # frozen BatchNorm: running statistics never move
        for a, b in zip(
            jax.tree.leaves(start[1]), jax.tree.leaves(jax.device_get(state.batch_stats))
        ):
            assert np.array_equal(a, b)
