"""End-to-end training on the synthetic VOC set: loss goes down, checkpoints, exact resume, eval.

Uses the real builder, pipeline, model registry and loop with a tiny-width FCN and 64 px crops.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import TINY_FCN, tiny_config, xla_flags

from flaxseg.serving import checkpoints
from flaxseg.training import evaluation, loop

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_lowers_loss_and_writes_checkpoint(data_dir, tmp_path):
    config = tiny_config(
        data_dir,
        steps=40,
        lr=0.02,
        log_every=5,
        model_kwargs=json.dumps({"base_width": 8, "fc_channels": 32}),
        backbone="vgg16_bn",
        model="fcn32s",
    )
    summary = loop.train_and_evaluate(config, tmp_path)
    losses = [entry["loss"] for entry in summary["history"]]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
    assert 0.0 <= summary["miou"] <= 1.0 and summary["step"] == 40
    manager = checkpoints.create_manager(tmp_path, read_only=True)
    # Saved every 6 steps and at the end; the last 3 are kept (the end is also the best).
    assert sorted(manager.all_steps()) == [30, 36, 40]
    meta = checkpoints.read_meta(manager, 40)
    assert meta["model_spec"]["model"] == "fcn32s"
    assert meta["model_spec"]["model_kwargs"] == {"base_width": 8, "fc_channels": 32}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["report"].splitlines()[-1].startswith("mIoU: ")


@pytest.mark.slow
def test_resume_continues_the_step_count_and_is_exact(data_dir, tmp_path):
    straight = loop.train_and_evaluate(tiny_config(data_dir), tmp_path / "straight")
    first = loop.train_and_evaluate(tiny_config(data_dir), tmp_path / "resumed", stop_at_step=6)
    assert first["step"] == 6
    second = loop.train_and_evaluate(tiny_config(data_dir), tmp_path / "resumed")
    assert second["step"] == 12
    assert [h["step"] for h in second["history"]] == [9, 12]  # continued, not restarted
    restore = lambda wd: checkpoints.restore(  # noqa: E731
        checkpoints.create_manager(wd, read_only=True), 12
    )["state"]["params"]
    a, b = restore(tmp_path / "straight"), restore(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert second["miou"] == pytest.approx(straight["miou"], abs=1e-6)


def test_workdir_of_another_model_is_refused_and_untouched(data_dir, tmp_path):
    loop.train_and_evaluate(tiny_config(data_dir, steps=2, checkpoint_every=2), tmp_path)
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"different model.*model='fcn8s' \(requested 'fcn32s'\)"):
        loop.train_and_evaluate(tiny_config(data_dir, steps=4, model="fcn32s"), tmp_path)
    with pytest.raises(ValueError, match=r"num_classes=21 \(requested 5\)"):
        loop.train_and_evaluate(tiny_config(data_dir, steps=4, num_classes=5), tmp_path)
    after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    assert before == after


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "fcn7s"}, r"Unknown --model='fcn7s'; available: .*fcn8s"),
        ({"dataset": "voc2007"}, r"Unknown --dataset='voc2007'; available: .*synthetic"),
        ({"backbone": "resnet9"}, r"resnet9.*vgg16"),
        ({"crop_size": 0}, r"--crop_size must be a positive integer, got 0"),
        ({"batch_size": -2}, r"--batch_size must be a positive integer, got -2"),
        ({"model_kwargs": "{base_width: 4"}, r"--model_kwargs=.*is not a JSON object"),
        ({"loss": "cross_entropie"}, r"Unknown loss 'cross_entropie'.*--config.loss.*dice"),
        ({"loss": "cross_entropy+*dice"}, r"Malformed loss expression 'cross_entropy\+\*dice'"),
        ({"class_weights": (1.0, 2.0)}, r"--config.class_weights has 2 values but there are 21"),
        (
            {"param_groups": ({"pattern": "fc6", "lr_mult": -1.0},)},
            r"--config.param_groups\[0\] lr_mult must be non-negative",
        ),
        ({"lr_schedule": "cosine"}, r"--config.lr_schedule='cosine' is not one of"),
        ({"adversarial": "blur"}, r"Unknown --adversarial='blur'; valid encodings: basic"),
        (
            {"adversarial": "basic", "adversary": "patchgan"},
            r"Unknown --adversary='patchgan'; available: .*largefov",
        ),
        ({"adversarial": "basic", "adv_weight": -0.1}, r"--adv_weight must be non-negative"),
    ],
)
def test_bad_settings_get_one_clear_error(data_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(tiny_config(data_dir, **overrides), tmp_path / "wd")
    assert not (tmp_path / "wd" / "checkpoints").exists()


def _run(args, **kwargs):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        **kwargs,
    )


@pytest.mark.slow
def test_train_and_eval_entry_points(data_dir, tmp_path):
    workdir = tmp_path / "wd"
    train = _run(
        [
            "train.py",
            "--config=flaxseg/configs/fcn8s_voc.py",
            "--dataset=synthetic",
            f"--data_dir={data_dir}",
            f"--workdir={workdir}",
            "--steps=4",
            "--batch_size=2",
            "--crop_size=48",
            f"--model_kwargs={TINY_FCN}",
            "--config.progress_bar=False",
        ]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "frozen: 3 arrays, e.g. upscore2/kernel" in train.stdout  # the recipe's groups
    train_miou = train.stdout.strip().splitlines()[-1]
    evaluate = _run(["eval.py", f"--workdir={workdir}"])
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    lines = evaluate.stdout.strip().splitlines()
    assert lines[-1].startswith("mIoU: 0.") and lines[-1] == train_miou
    assert any(line.startswith("aeroplane") for line in lines)
    assert any(line.startswith("pixel accuracy: ") for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.py", "--model=nope", "--dataset=synthetic"], "Unknown --model='nope'"),
        (
            ["train.py", "--model=fcn8s", "--dataset=synthetic", "--crop_size=-1"],
            "--crop_size must be a positive integer",
        ),
        (["eval.py"], "holds no checkpoints"),
        (
            ["train.py", "--dataset=synthetic", "--adversarial=basic", "--adv_weight=-1"],
            "--adv_weight must be non-negative",
        ),
    ],
)
def test_entry_points_print_one_line_errors(tmp_path, args, message):
    result = _run([*args, f"--workdir={tmp_path / 'empty'}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"{args[0]}: error: ")
    assert message in result.stderr


_DATA_PARALLEL = r"""
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from flaxseg import models
from flaxseg import losses
from flaxseg.training import loop, optim, sharding, spec, state as state_lib, steps
from flaxseg.configs import default
assert jax.device_count() == 2, jax.devices()
config = default.get_config()
config.num_classes = 5
config = spec.resolve_config(config)
config.batch_size = 3
try:
    spec.validate_config(config)
    raise SystemExit("batch_size=3 accepted on 2 devices")
except ValueError as error:
    assert "not divisible by the 2 devices" in str(error), error
model = models.create_model("fcn32s", num_classes=5, backbone="vgg16_bn", base_width=4,
                            fc_channels=8)
tx = optim.create_optimizer(learning_rate=0.1)
state = state_lib.create_train_state(model, tx, jax.random.key(0), (1, 40, 40, 3))
rng = np.random.default_rng(0)
batch = {"image": rng.normal(size=(4, 40, 40, 3)).astype(np.float32),
         "label": rng.integers(0, 5, (4, 40, 40)).astype(np.int32)}
batch["label"][:, :3] = 255
key = jax.random.key(1)
ce = losses.build_loss("cross_entropy", num_classes=5)
step = functools.partial(steps.train_step, loss_fn=ce, ignore_label=255)
single, m1 = jax.jit(step)(state, batch, key)
mesh = sharding.create_mesh()
sharded, m2 = loop.jit_train_step(config, mesh)(state, sharding.shard_batch(batch, mesh), key)
leaves = lambda s: jax.tree.leaves((s.params, s.batch_stats))
err_mesh = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves(single), leaves(sharded)))
# pmap: each device sees half the batch; BatchNorm batch statistics are then per-device, so compare
# the gradient-averaging path with a model without BatchNorm.
plain = models.create_model("fcn32s", num_classes=5, backbone="vgg16", base_width=4, fc_channels=8)
pstate = state_lib.create_train_state(plain, tx, jax.random.key(0), (1, 40, 40, 3))
replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)
eval_fn = functools.partial(steps.eval_step, num_classes=5, ignore_label=255)
cm_single = jax.jit(eval_fn)(pstate, batch)
halves = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), batch)
cm_pmap = jax.pmap(functools.partial(eval_fn, axis_name="d"), axis_name="d")(
    replicate(pstate), halves)
assert np.array_equal(np.asarray(cm_single), np.asarray(cm_pmap[0])), (cm_single, cm_pmap[0])
pmap_step = functools.partial(steps.train_step, loss_fn=ce, ignore_label=255, axis_name="d")
pm_state, pm_metrics = jax.pmap(pmap_step, axis_name="d")(replicate(pstate), halves,
                                                          replicate(key))
same = [float(jnp.max(jnp.abs(a[0] - a[1]))) for a in jax.tree.leaves(pm_state.params)]
# The adversarial step under pmap: both networks' gradients are averaged over the axis.
from flaxseg.training import adversarial
adv = adversarial.init_adversary("largefov_light", encoding="basic", num_classes=5,
                                 input_shape=(1, 40, 40, 3), rng=jax.random.key(2),
                                 tx=optax.adam(1e-3), width=0.125)
adv_step = functools.partial(adversarial.train_step, loss_fn=ce, encoding="basic", num_classes=5,
                             ignore_label=255, adv_weight=0.5, axis_name="d")
adv_state, _ = jax.pmap(adv_step, axis_name="d")(replicate(pstate.replace(adversary=adv)),
                                                  halves, replicate(key))
same += [float(jnp.max(jnp.abs(a[0] - a[1])))
         for a in jax.tree.leaves((adv_state.params, adv_state.adversary.params))]
print(json.dumps({"err_mesh": err_mesh, "pmap_replicas_differ": max(same),
                  "loss_single": float(m1["loss"]), "loss_mesh": float(m2["loss"])}))
"""


@pytest.mark.slow
def test_data_parallel_mesh_matches_single_device_and_pmap_runs(tmp_path):
    result = _run(["-c", _DATA_PARALLEL], env={"XLA_FLAGS": xla_flags(2)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["err_mesh"] < 1e-5, report
    assert report["loss_single"] == pytest.approx(report["loss_mesh"], rel=1e-5)
    assert report["pmap_replicas_differ"] == 0.0, report  # gradients were averaged over the axis


def _tiny_resnet_torch_file(path, base_width):
    """A torchvision-layout ResNet-50 state dict of tiny width (what a user's .pth holds)."""
    import torch
    from flax import traverse_util

    from flaxseg.models.backbones.resnet import ResNet, torchvision_resnet_key_map

    resnet = ResNet(depth=50, base_width=base_width)
    variables = resnet.init(jax.random.key(7), np.zeros((1, 32, 32, 3), np.float32))
    flat = traverse_util.flatten_dict(variables)
    state = {}
    for flax_path, key in torchvision_resnet_key_map(50).items():
        value = np.asarray(flat[flax_path])
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        state[key] = torch.from_numpy(np.array(value))  # a writable copy
    torch.save(state, path)
    return flat


@pytest.mark.slow
def test_pretrained_backbone_is_loaded_and_reported(data_dir, tmp_path, capsys):
    source = _tiny_resnet_torch_file(tmp_path / "resnet50.pth", base_width=4)
    config = tiny_config(
        data_dir,
        model="deeplabv3plus",
        backbone="resnet50",
        steps=1,
        lr=1e-9,
        model_kwargs=json.dumps(
            {"base_width": 4, "aspp_channels": 8, "low_level_channels": 4, "decoder_channels": 8}
        ),
        pretrained=str(tmp_path / "resnet50.pth"),
    )
    loop.train_and_evaluate(config, tmp_path / "wd")
    assert "stayed random" in capsys.readouterr().out
    params = checkpoints.restore(checkpoints.create_manager(tmp_path / "wd", read_only=True), 1)[
        "state"
    ]["params"]
    # With a vanishing learning rate, the trained backbone still equals the file.
    kernel = source[("params", "layer3_1", "conv2", "kernel")]
    np.testing.assert_allclose(params["backbone"]["layer3_1"]["conv2"]["kernel"], kernel, atol=1e-6)

    with pytest.raises(FileNotFoundError, match="--pretrained=.*missing.pth does not exist"):
        loop.train_and_evaluate(
            tiny_config(data_dir, pretrained=str(tmp_path / "missing.pth")), tmp_path / "wd2"
        )


@pytest.mark.slow
def test_deeplab_evaluates_at_another_output_stride(data_dir, tmp_path):
    config = tiny_config(
        data_dir,
        model="deeplabv3",
        backbone="resnet18",
        steps=1,
        output_stride=16,
        model_kwargs=json.dumps({"base_width": 4, "aspp_channels": 8}),
    )
    trained = loop.train_and_evaluate(config, tmp_path)
    at_16 = evaluation.evaluate_workdir(tmp_path)
    at_8 = evaluation.evaluate_workdir(tmp_path, output_stride=8)
    assert at_16["miou"] == pytest.approx(trained["miou"], abs=1e-6)
    assert 0.0 <= at_8["miou"] <= 1.0
    with pytest.raises(ValueError, match="output_stride"):
        evaluation.evaluate_workdir(tmp_path, output_stride=12)


@pytest.mark.slow
def test_init_from_copies_matching_parameters_of_another_run(data_dir, tmp_path, capsys):
    """FCN's staged training: FCN-16s starts from a trained FCN-32s; the new skip starts at 0."""
    first = tiny_config(data_dir, model="fcn32s", steps=2, checkpoint_every=2)
    loop.train_and_evaluate(first, tmp_path / "fcn32s")
    source = checkpoints.restore(
        checkpoints.create_manager(tmp_path / "fcn32s", read_only=True), 2
    )["state"]["params"]
    second = tiny_config(
        data_dir, model="fcn16s", steps=1, lr=1e-12, init_from=str(tmp_path / "fcn32s")
    )
    loop.train_and_evaluate(second, tmp_path / "fcn16s")
    out = capsys.readouterr().out
    assert "Initialised" in out and "kept as initialised: score_pool4/" in out
    params = checkpoints.restore(
        checkpoints.create_manager(tmp_path / "fcn16s", read_only=True), 1
    )["state"]["params"]
    for path in (("fc6", "kernel"), ("score_fr", "kernel"), ("backbone", "features_28", "kernel")):
        a, b = source, params
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)

    with pytest.raises(
        ValueError, match=r"num_classes=21, but this run's fcn16s has num_classes=5"
    ):
        loop.train_and_evaluate(
            tiny_config(
                data_dir, model="fcn16s", num_classes=5, init_from=str(tmp_path / "fcn32s")
            ),
            tmp_path / "other",
        )
    with pytest.raises(FileNotFoundError, match=r"--init_from=.*nowhere holds no checkpoints"):
        loop.train_and_evaluate(
            tiny_config(data_dir, init_from=str(tmp_path / "nowhere")), tmp_path / "other2"
        )
