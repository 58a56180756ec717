"""``remat=True`` (``--config.remat``): the backbone's units are rematerialised in the backward
pass with the same variables, loss and gradients, and less compiled temporary memory.

One compile per (model, remat) serves the parity and the memory checks; tiny widths, 64 px.
XLA's CPU pipeline drops the optimisation barriers that ``jax.checkpoint`` puts around the
recomputation early (its ``cse_barrier_expander`` pass) and then CSE merges the recomputed
activations back into the saved ones, so on CPU remat changes nothing unless that pass is off;
GPU and TPU keep the barriers. The memory check compiles with the pass off, as the training
loop does on CPU with ``--config.remat=True`` (``loop.remat_compiler_options``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models
from helpers import set_model, tiny_model_config

from flaxseg import models
from flaxseg.configs import default
from flaxseg.models import backbones
from flaxseg.training import checkpointing, cli, loop, spec

pytestmark = pytest.mark.slow  # compiles gradients of every backbone with and without remat

NUM_CLASSES = 3
# What GPU/TPU compilers do by themselves, and the loop does on CPU: keep the barriers.
KEEP_REMAT = loop.CPU_REMAT_COMPILER_OPTIONS
IMAGE_SHAPE = (2, 64, 64, 3)
MODELS = {
    "deeplabv3plus_resnet18": ("deeplabv3plus", tiny_models.TINY_KWARGS["deeplabv3plus"]),
    "unet_efficientnet-b0": ("unet", dict(backbone="efficientnet-b0", base_channels=4)),
}


def _variables(model):
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE[1:])))
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


def _loss(model, params, batch_stats, images, labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(1)},
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates["batch_stats"]


def _compiled_grad(model, variables, images, labels):
    """The jitted loss-and-gradient of ``model``, compiled once (also for memory_analysis)."""
    fn = jax.value_and_grad(functools.partial(_loss, model), has_aux=True)
    lowered = jax.jit(fn).lower(variables["params"], variables["batch_stats"], images, labels)
    return lowered.compile(KEEP_REMAT)


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    """{remat: (variable shapes, ((loss, batch_stats), grads), temp bytes)} of one model, both
    from the same variables."""
    name, kwargs = MODELS[request.param]
    images = jax.random.normal(jax.random.key(2), IMAGE_SHAPE)
    labels = jax.random.randint(jax.random.key(3), IMAGE_SHAPE[:3], 0, NUM_CLASSES)
    variables, out = None, {}
    for remat in (False, True):
        model = models.create_model(name, num_classes=NUM_CLASSES, remat=remat, **kwargs)
        shapes = jax.eval_shape(functools.partial(_variables, model))
        variables = variables or _variables(model)  # remat=True's tree is checked to be the same
        compiled = _compiled_grad(model, variables, images, labels)
        result = compiled(variables["params"], variables["batch_stats"], images, labels)
        out[remat] = (shapes, result, compiled.memory_analysis().temp_size_in_bytes)
    return out


def _assert_close(actual, expected, rtol=1e-5):
    # Relative to each leaf's scale, floored at 1% of the tree's: a leaf whose gradient is zero
    # in exact arithmetic (a BatchNorm bias that another BatchNorm cancels) holds only rounding.
    floor = 0.01 * max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(expected))
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a), np.asarray(b)
        err = float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), floor)
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative difference {err:.2e}"


def test_remat_keeps_the_variables(pair):
    plain, remat = pair[False][0], pair[True][0]
    assert jax.tree.structure(remat) == jax.tree.structure(plain)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), remat) == jax.tree.map(
        lambda x: (x.shape, x.dtype), plain
    )


def test_remat_gives_the_same_loss_gradients_and_statistics(pair):
    ((loss, stats), grads), ((remat_loss, remat_stats), remat_grads) = (
        pair[False][1],
        pair[True][1],
    )
    assert float(remat_loss) == pytest.approx(float(loss), rel=1e-5)
    _assert_close(remat_grads, grads)
    _assert_close(remat_stats, stats)


def test_remat_needs_less_temporary_memory(pair):
    assert pair[True][2] < pair[False][2], (pair[True][2], pair[False][2])


@pytest.mark.parametrize("backbone", ["resnet18", "xception65", "mobilenet_v2", "efficientnet_b0"])
def test_remat_wraps_every_unit_of_the_backbone(backbone):
    kwargs = dict(num_middle_units=1) if backbone == "xception65" else {}
    x = jnp.zeros((1, 32, 32, 3))
    counts, structures = {}, {}
    for remat in (False, True):
        module = backbones.create(backbone, base_width=4, remat=remat, **kwargs)
        variables = jax.eval_shape(
            functools.partial(module.init, train=False), jax.random.key(0), x
        )
        jaxpr = jax.make_jaxpr(functools.partial(module.apply, train=False))(variables, x).jaxpr
        counts[remat] = sum(
            eqn.primitive.name.startswith(("checkpoint", "remat")) for eqn in jaxpr.eqns
        )
        structures[remat] = jax.tree.structure(variables)
    units = {"resnet18": 8, "xception65": 6, "mobilenet_v2": 17, "efficientnet_b0": 16}
    assert structures[True] == structures[False]
    assert counts == {False: 0, True: units[backbone]}


def test_train_with_remat_and_resume_without(data_dir, tmp_path):
    # test_registry_training's tiny DeepLab v3+ run, on the smallest ResNet (fewer units to
    # compile).
    kwargs = {**tiny_models.TINY_KWARGS["deeplabv3plus"], "backbone": "resnet18"}
    config = tiny_model_config("deeplabv3plus", data_dir, kwargs)
    config.remat = True
    if jax.default_backend() == "cpu":  # the step keeps the recomputation (module docstring)
        assert loop.remat_compiler_options(config) == KEEP_REMAT
    summary = loop.train_and_evaluate(config, tmp_path, stop_at_step=2)
    assert summary["step"] == 2 and np.isfinite(summary["history"][-1]["loss"])
    # remat is not part of the model spec: the same workdir resumes without it (into a model
    # without remat, whose state the checkpoint fills; at step 2 again it only evaluates).
    config.remat = False
    resumed = loop.train_and_evaluate(config, tmp_path, stop_at_step=2)
    assert resumed["step"] == 2 and resumed["miou"] == pytest.approx(summary["miou"], abs=1e-6)


def test_remat_must_be_a_bool():
    config = default.get_config()
    set_model(config, "fcn8s")
    config.dataset, config.num_classes = "synthetic", 3
    with config.unlocked():
        del config.remat
        config.remat = "yes"
    with pytest.raises(ValueError, match="--config.remat must be True or False"):
        spec.validate_config(config)


def test_remat_in_model_kwargs_is_not_part_of_the_architecture(tmp_path):
    saved = {"model": "deeplabv3", "num_classes": 21, "backbone": "resnet50", "model_kwargs": {}}
    checkpointing.check_compatible(saved, {**saved, "model_kwargs": {"remat": True}}, tmp_path)


def test_out_of_memory_hint_offers_remat_to_training_only(capsys):
    def too_big():  # 4 TiB: XLA refuses the allocation with RESOURCE_EXHAUSTED
        return jax.jit(lambda: jnp.ones((1 << 40,), jnp.float32))()

    for program, offered in (("train.py", True), ("eval.py", False)):
        with pytest.raises(SystemExit):
            cli.run_or_exit(program, too_big)
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert ("--config.remat=True" in line) == offered, line
        assert "--config.dtype=bfloat16" in line, line
