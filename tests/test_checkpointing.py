"""Checkpoint retention (last K + best by mIoU), step resolution and the model-spec guard."""

import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.serving import checkpoints
from flaxseg.training import checkpointing


def _save(manager, step, miou=None):
    state = {
        "step": jnp.asarray(step),
        "params": {"w": jnp.full((2,), float(step))},
        "batch_stats": {},
        "opt_state": (),
    }
    checkpointing.save(
        manager,
        step,
        state=state,
        data_state={"next_index": step * 4},
        meta={"model_spec": {"model": "fcn8s", "num_classes": 21}},
        metrics=None if miou is None else {"miou": miou},
    )


def test_keeps_the_last_k_and_the_best_by_miou(tmp_path):
    manager = checkpoints.create_manager(tmp_path, keep=2)
    mious = {2: 0.9, 4: 0.2, 6: 0.4}
    for step in range(1, 8):
        _save(manager, step, mious.get(step))
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 6, 7]  # best (0.9) + the last two
    assert checkpoints.best_step(manager) == 2
    assert checkpoints.resolve_step(manager, "best") == 2
    assert checkpoints.resolve_step(manager, "latest") == 7
    assert checkpoints.resolve_step(manager, "6") == 6
    with pytest.raises(ValueError, match=r"--checkpoint='5' is not 'latest', 'best' or one of"):
        checkpoints.resolve_step(manager, "5")
    # A restarted run (new manager) still knows and keeps the best checkpoint.
    manager = checkpoints.create_manager(tmp_path, keep=2)
    for step in (8, 9):
        _save(manager, step)
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 8, 9]
    assert checkpoints.best_step(checkpoints.create_manager(tmp_path, read_only=True)) == 2
    restored = checkpoints.restore(manager, 8)
    np.testing.assert_array_equal(restored["state"]["params"]["w"], [8.0, 8.0])
    assert restored["data"] == {"next_index": 32}
    assert restored["meta"]["model_spec"]["model"] == "fcn8s"


def test_best_needs_a_checkpoint_with_metrics(tmp_path):
    manager = checkpoints.create_manager(tmp_path, keep=2)
    _save(manager, 1)
    manager.wait_until_finished()
    with pytest.raises(
        ValueError, match="was saved with a validation mIoU; use --checkpoint=latest"
    ):
        checkpoints.resolve_step(manager, "best")


def test_compute_dtype_is_not_part_of_the_architecture(tmp_path):
    spec = {
        "model": "deeplabv3",
        "num_classes": 21,
        "backbone": "resnet50",
        "model_kwargs": {"output_stride": 16},
    }
    checkpointing.check_compatible(
        spec, {**spec, "model_kwargs": {"output_stride": 16, "dtype": "bfloat16"}}, tmp_path
    )
    with pytest.raises(ValueError, match=r"backbone='resnet50' \(requested 'resnet101'\)"):
        checkpointing.check_compatible(spec, {**spec, "backbone": "resnet101"}, tmp_path)
