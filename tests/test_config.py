"""One parsed model config: ``config.model`` (name, backbone, kwargs: a dict) is what
``models.create_model(**config.model, ...)`` takes; train.py's shortcut flags (one table,
``cli.SHORTCUTS``) write into it, ``--model_kwargs``' JSON is parsed once there, and the spec a
checkpoint records is the one it always had."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from flaxseg import models
from flaxseg.configs import default
from flaxseg.serving import restore
from flaxseg.training import cli
from flaxseg.training import spec as spec_lib

REPO = Path(__file__).resolve().parents[1]


def test_flags_merge_into_a_recipes_model_arguments():
    recipe = importlib.import_module("flaxseg.configs.deeplabv2_voc").get_config()
    recipe.lock()  # as train.py's --config flag leaves it
    config = cli.apply_overrides(
        recipe,
        {
            "backbone": "resnet50",
            "model_kwargs": '{"base_width": 4, "input_scales": [1.0]}',
            "output_stride": 16,
            "steps": None,  # not given: the recipe's value stays
        },
    )
    assert config.model.name == "deeplabv2" and config.model.backbone == "resnet50"
    assert config.model.kwargs.to_dict() == {
        "input_scales": [1.0],  # the flag's entry wins
        "frozen_batchnorm": True,  # the recipe's stays
        "output_stride": 16,
        "base_width": 4,
    }
    assert config.steps == recipe.steps
    assert recipe.model.kwargs.output_stride == 8  # the recipe itself is not changed
    # --output_stride on a config whose kwargs do not name it yet, and a dict instead of JSON.
    config = cli.apply_overrides(default.get_config(), {"output_stride": 8, "model": "deeplabv3"})
    assert config.model.kwargs.to_dict() == {"output_stride": 8}
    config = cli.apply_overrides(config, {"model_kwargs": {"aspp_channels": 8}})
    assert config.model.kwargs.to_dict() == {"output_stride": 8, "aspp_channels": 8}


@pytest.mark.parametrize(
    "text, message",
    [
        ("{base_width: 4", r"^--model_kwargs='\{base_width: 4' is not a JSON object: .*\.$"),
        ("[4]", r"^--model_kwargs='\[4\]' is not a JSON object\.$"),
    ],
)
def test_model_kwargs_that_are_not_a_json_object_get_one_sentence(text, message):
    with pytest.raises(ValueError, match=message):
        cli.apply_overrides(default.get_config(), {"model_kwargs": text})


def test_create_model_takes_the_config_group_as_the_spec_does():
    config = default.get_config()
    config.model.name = "deeplabv3"
    config.model.backbone = "resnet50"
    config.model.kwargs = {"base_width": 4, "aspp_channels": 8, "output_stride": 16}
    config.num_classes = 3
    direct = models.create_model(**config.model, num_classes=3)
    through_spec = restore.build_model(spec_lib.model_spec(config))
    assert direct.backbone == through_spec.backbone == "resnet50"
    assert direct.output_stride == through_spec.output_stride == 16
    image = jnp.zeros((1, 32, 32, 3))
    shapes = [
        jax.tree.map(lambda x: x.shape, jax.eval_shape(m.init, jax.random.key(0), image))
        for m in (direct, through_spec)
    ]
    assert shapes[0] == shapes[1]


def test_the_spec_of_a_config_compares_equal_to_what_a_checkpoint_read_back():
    """Tuples in a recipe's kwargs become the lists a JSON checkpoint reads back."""
    config = default.get_config()
    config.model.name = "deeplabv2"
    config.model.kwargs = {"input_scales": (1.0, 0.5), "base_width": 4}
    config.num_classes = 21
    spec = spec_lib.model_spec(config)
    assert spec == {
        "model": "deeplabv2",
        "num_classes": 21,
        "backbone": None,
        "in_channels": 3,
        "param_dtype": "float32",
        "model_kwargs": {"input_scales": [1.0, 0.5], "base_width": 4},
    }
    assert spec_lib.spec_differences(spec, {**spec, "backbone": "resnet101"}) == {}


def _train_py(*args):
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )


def test_train_py_lists_every_shortcut_flag_in_its_help():
    result = _train_py("--help")  # absl's --help exits with status 1
    for name, _, help_text, _ in cli.SHORTCUTS:
        assert f"  --{name}: {help_text.split()[0]}" in result.stdout, name


@pytest.mark.parametrize(
    "args, message",
    [
        # The nested field reaches the model (which names the backbone it does not know).
        (["--dataset=synthetic", "--config.model.backbone=resnet9"], "resnet9"),
        (
            ["--config.backbone=vgg16"],
            "--config.backbone names no config field; use --backbone (it sets "
            "--config.model.backbone).",
        ),
        (
            ["--config.model=unet"],
            "--config.model is a group (name, backbone, kwargs); use --model=unet or "
            "--config.model.name=unet.",
        ),
        (
            ["--config=flaxseg/configs/deeplabv3_voc.py", "--config.model.kwargs.bogus=1"],
            "--config.model.kwargs.bogus names no config field; set a new model argument with "
            "--model_kwargs='{\"bogus\": ...}'.",
        ),
        (
            [
                "--config=flaxseg/configs/deeplabv3_voc.py",
                "--dataset=synthetic",
                "--config.model.kwargs={'bogus': 1}",
            ],
            "Model 'deeplabv3' does not take bogus; its arguments are:",
        ),
        (["--model_kwargs=[4]"], "--model_kwargs='[4]' is not a JSON object."),
    ],
)
def test_train_py_model_settings_errors_are_one_sentence(tmp_path, args, message):
    result = _train_py(*args, f"--workdir={tmp_path / 'wd'}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and message in last, last
    assert not (tmp_path / "wd").exists()
