"""The training loop: where data meets models.

Its parts live beside it: `spec` (configuration checks, the model spec), `inputs` (the input
pipeline), `sharding` (the mesh), `initialization` (--pretrained, --init_from), `evaluation`
(the eval step, reports, eval.py), `reporting` (stdout, progress bar, TensorBoard),
`checkpointing` (Orbax).
"""

import functools
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
import optax

from flaxseg import models
from flaxseg.training import (
    adversarial,
    checkpointing,
    evaluation,
    initialization,
    inputs,
    optim,
    reporting,
    steps,
)
from flaxseg.training import spec as spec_lib
from flaxseg.training import state as state_lib
from flaxseg.training.sharding import create_mesh, replicated, shard_batch


def _jit_step(step, mesh):
    return jax.jit(step, out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


def jit_train_step(config, mesh):
    """The configured train step, jitted over the mesh: the plain one, or with --adversarial the
    adversary's updates followed by the segmenter's."""
    common = dict(
        loss_fn=spec_lib.create_loss(config),
        ignore_label=config.ignore_label,
        aux_loss_weight=config.aux_loss_weight,
    )
    if not config.adversarial:
        return _jit_step(functools.partial(steps.train_step, **common), mesh)
    return _jit_step(
        functools.partial(
            adversarial.train_step,
            **common,
            encoding=config.adversarial,
            num_classes=config.num_classes,
            adv_weight=config.adv_weight,
            adversary_updates=config.adv_updates,
            tau=config.adv_tau,
        ),
        mesh,
    )


def jit_pretrain_step(config, mesh):
    """The adversary-only step of the first --config.adv_pretrain_steps steps."""
    return _jit_step(
        functools.partial(
            adversarial.pretrain_step,
            encoding=config.adversarial,
            num_classes=config.num_classes,
            ignore_label=config.ignore_label,
            tau=config.adv_tau,
        ),
        mesh,
    )


def create_optimizer(config):
    """The configured SGD (with its parameter groups) and the learning-rate schedule."""
    # With adversary pre-training the segmenter's schedule spans only its own updates.
    segmenter_steps = config.steps - (config.adv_pretrain_steps if config.adversarial else 0)
    schedule = optim.learning_rate_schedule(
        config.lr,
        segmenter_steps,
        kind=config.lr_schedule,
        power=config.lr_power,
        step_size=config.lr_step_size,
        gamma=config.lr_gamma,
        warmup_steps=config.warmup_steps,
    )
    tx = optim.create_optimizer(
        learning_rate=schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        param_groups=config.param_groups,
    )
    return tx, schedule


def adversary_optimizer(config) -> optax.GradientTransformation:
    if config.adv_optimizer == "adam":
        return optax.adam(config.adv_lr)
    return optax.sgd(config.adv_lr, momentum=config.momentum)


def init_state(model, tx, config, mesh):
    """The train state, initialised on the mesh (with the adversary's under --adversarial)."""
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    input_shape = (1, config.crop_size, config.crop_size, 3)

    def create(rng):
        state = state_lib.create_train_state(model, tx, rng, input_shape)
        if config.adversarial:
            state = state.replace(
                adversary=adversarial.init_adversary(
                    config.adversary,
                    encoding=config.adversarial,
                    num_classes=config.num_classes,
                    input_shape=input_shape,
                    rng=jax.random.fold_in(rng, 1),
                    tx=adversary_optimizer(config),
                    dtype=spec_lib.DTYPES[config.dtype],
                    **spec_lib.parse_model_kwargs(config.adversary_kwargs),
                )
            )
        return state

    return jax.jit(create, out_shardings=replicated(mesh))(init_rng)


def _mean_scalars(window: list) -> dict:
    return {key: float(np.mean([m[key] for m in jax.device_get(window)])) for key in window[0]}


def train_and_evaluate(config, workdir, *, stop_at_step: Optional[int] = None) -> dict:
    """Trains `config.model` on `config.dataset`, resuming from `workdir` if it holds a checkpoint.

    `stop_at_step` ends this run early (with a checkpoint) although the schedule spans
    `config.steps`, e.g. to fit a time-limited job; running again continues exactly.
    Returns the last validation summary ({'miou', 'pixel_accuracy', ...}), 'step', 'report' (the
    printed per-class table) and 'history' (the logged training scalars, one dict per log step).
    """
    config = spec_lib.resolve_config(config)
    spec_lib.validate_config(config)
    spec = spec_lib.model_spec(config)
    workdir = Path(workdir)
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints, read_only=True)
    latest = manager.latest_step()
    if latest is not None:
        checkpointing.check_compatible(
            checkpointing.read_meta(manager, latest)["model_spec"], spec, workdir
        )
    model = spec_lib.build_model(spec, spec_lib.DTYPES[config.dtype])  # checks its arguments

    train_iterator = inputs.create_train_iterator(config)
    mesh = create_mesh()
    tx, schedule = create_optimizer(config)
    state = init_state(model, tx, config, mesh)
    reporting.say(
        f"{config.model}: {models.count_params(state.params):,} parameters, "
        f"{jax.device_count()} device(s), global batch {config.batch_size}, loss {config.loss}"
    )
    if config.param_groups:
        groups = optim.param_groups(state.params, config.param_groups, config.weight_decay)
        reporting.say("Parameter groups:\n" + optim.describe_groups(groups))

    if latest is None and config.init_from:
        state = initialization.init_from(state, config.init_from, spec, mesh)
    if latest is None and config.pretrained:
        state = initialization.load_pretrained(state, config.pretrained, model, mesh)
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
    if latest is not None:
        restored = checkpointing.restore(manager, latest, state_lib.state_to_checkpoint(state))
        state = state_lib.state_from_checkpoint(state, restored["state"])
        train_iterator.set_state(restored["data"])
        reporting.say(f"Resumed from {checkpointing.checkpoint_dir(workdir)} at step {latest}.")

    train_fn = jit_train_step(config, mesh)
    # The segmenter's optimiser (and schedule) only counts its own updates.
    pretrain_steps = config.adv_pretrain_steps if config.adversarial else 0
    pretrain_fn = jit_pretrain_step(config, mesh) if pretrain_steps else None
    eval_fn = evaluation.jit_eval_step(config.num_classes, config.ignore_label, mesh)

    def validate(state):
        confusion = evaluation.evaluate(
            state, inputs.create_eval_iterator(config), eval_fn, mesh, config.num_classes
        )
        return confusion, evaluation.summarize(confusion)

    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    writer = reporting.MetricWriter(workdir)
    meta = {"model_spec": spec, "config": config.to_dict()}

    start = int(jax.device_get(state.step))
    summary, confusion, history = {}, None, []
    last_step = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    progress = reporting.progress_bar(config.steps, start, config.progress_bar)
    window, window_start = [], time.perf_counter()
    for step in range(start + 1, last_step + 1):
        step_fn = train_fn
        if step <= pretrain_steps:
            step_fn = pretrain_fn
        state, train_metrics = step_fn(state, shard_batch(next(train_iterator), mesh), dropout_rng)
        if window and set(train_metrics) != set(window[0]):  # pre-training ended: new metrics
            window, window_start = [], time.perf_counter()
        window.append(train_metrics)
        if step % config.log_every == 0 or step == last_step:
            scalars = _mean_scalars(window)
            scalars["images_per_second"] = (
                len(window) * config.batch_size / (time.perf_counter() - window_start)
            )
            scalars["learning_rate"] = float(schedule(max(0, step - 1 - pretrain_steps)))
            writer.write_scalars(
                step, {f"train/{k}": v for k, v in scalars.items()}, log=progress is None
            )
            history.append({"step": step, **scalars})
            if progress is not None:
                shown = {k: f"{scalars[k]:.4f}" for k in ("loss", "adversary_loss") if k in scalars}
                progress.set_postfix(**shown, img_per_s=f"{scalars['images_per_second']:.1f}")
            window, window_start = [], time.perf_counter()
        if progress is not None:
            progress.update(1)

        evaluated = step % config.eval_every == 0 or step == last_step
        if evaluated:
            confusion, summary = validate(state)
            writer.write_scalars(step, {f"val/{k}": v for k, v in summary.items()})
        if step % config.checkpoint_every == 0 or step == last_step:
            checkpointing.save(
                manager,
                step,
                state=state_lib.state_to_checkpoint(state),
                data_state=train_iterator.get_state(),
                meta=meta,
                metrics={"miou": summary["miou"]} if evaluated else None,
            )
    if progress is not None:
        progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if confusion is None:  # the run had already reached config.steps: report the saved model
        confusion, summary = validate(state)
    summary["step"] = int(jax.device_get(state.step))
    summary["report"] = evaluation.format_report(
        confusion, spec_lib.class_names(config.dataset, config.num_classes)
    )
    summary["history"] = history
    return summary
