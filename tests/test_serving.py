"""flaxseg.serving: the exported-model loader imports neither the models nor training, and the
one restore of a workdir for inference rebuilds the recorded model and refuses, for prediction
and export, one that does not take RGB images."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from flaxseg.configs import default
from flaxseg.serving import checkpoints, restore
from flaxseg.training import checkpointing

REPO = Path(__file__).resolve().parents[1]


def test_the_loader_imports_neither_models_nor_training_nor_flax():
    code = (
        "import sys, flaxseg.export, flaxseg.serving.loader\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'flaxseg'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()[-1].split(",")
    assert loaded == ["flaxseg", "flaxseg.export", "flaxseg.serving", "flaxseg.serving.loader"]


def _one_channel_workdir(workdir: Path) -> dict:
    """A checkpoint of a tiny single-channel FCN-32s written as training writes one."""
    config = default.get_config()
    config.dataset, config.crop_size = "synthetic", 32
    spec = {
        "model": "fcn32s",
        "num_classes": 21,
        "backbone": None,
        "in_channels": 1,
        "param_dtype": "float32",
        "model_kwargs": tiny_models.TINY_KWARGS["fcn32s"],
    }
    model = restore.build_model(spec)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False)
    manager = checkpoints.create_manager(workdir)
    state = {"step": jnp.asarray(1), "params": variables["params"], "batch_stats": {}}
    meta = {"model_spec": spec, "config": config.to_dict()}
    checkpointing.save(manager, 1, state=state, data_state={}, meta=meta)
    manager.wait_until_finished()
    return variables


def test_restore_rebuilds_the_recorded_model_and_refuses_non_rgb_for_prediction(tmp_path):
    variables = _one_channel_workdir(tmp_path)
    restored = restore.restore_model(tmp_path)  # eval.py: any input channels
    assert restored["step"] == 1 and restored["model"].in_channels == 1
    assert restored["class_names"][15] == "person" and restored["colormap"].shape == (256, 3)
    for saved, loaded in zip(
        jax.tree.leaves(variables["params"]), jax.tree.leaves(restored["variables"]["params"])
    ):
        np.testing.assert_array_equal(saved, loaded)
    with pytest.raises(ValueError) as error:  # predict.py, export.py
        restore.restore_model(tmp_path, rgb=True)
    assert str(error.value) == (
        f"Prediction and export take RGB images, but the model of --workdir={tmp_path} takes "
        "1 input channels."
    )
