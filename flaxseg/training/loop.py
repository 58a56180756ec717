"""The training loop: where data meets models.

Its parts live beside it: `spec` (configuration checks, the model spec), `inputs` (the input
pipeline), `sharding` (the mesh), `initialization` (--pretrained, --init_from), `evaluation`
(the eval step, reports, eval.py), `reporting` (stdout, progress bar, TensorBoard),
`checkpointing` (Orbax saves; `flaxseg.serving.checkpoints` reads them).
"""

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
import optax

from flaxseg import models
from flaxseg.serving import checkpoints, restore
from flaxseg.training import (
    adversarial,
    checkpointing,
    evaluation,
    initialization,
    inputs,
    optim,
    preemption,
    reporting,
    sharding,
    steps,
)
from flaxseg.training import spec as spec_lib
from flaxseg.training import state as state_lib
from flaxseg.training.sharding import PMAP_AXIS, create_mesh, replicated, shard_batch

# XLA's CPU pipeline drops jax.checkpoint's optimisation barriers early (its
# cse_barrier_expander pass) and CSE then merges the recomputation back into the saved
# activations: --config.remat would save nothing there. GPU and TPU compilers keep the barriers.
CPU_REMAT_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _jit_step(step, mesh, compiler_options=None, parallel: str = "jit"):
    """The step jitted over the mesh, or with --parallel=pmap mapped over the local devices
    (state and batch with a leading device axis, the key shared)."""
    if parallel == "pmap":
        return jax.pmap(
            functools.partial(step, axis_name=PMAP_AXIS),
            axis_name=PMAP_AXIS,
            in_axes=(0, 0, None),
            donate_argnums=0,
        )
    return jax.jit(
        step,
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )


def remat_compiler_options(config):
    """The compiler options that keep --config.remat's recomputation on this backend, or None."""
    if config.get("remat", False) and jax.default_backend() == "cpu":
        return CPU_REMAT_COMPILER_OPTIONS
    return None


def jit_train_step(config, mesh):
    """The configured train step, jitted over the mesh (or pmapped, --parallel=pmap): the plain
    one, or with --adversarial the adversary's updates followed by the segmenter's."""
    common = dict(
        loss_fn=spec_lib.create_loss(config),
        ignore_label=config.ignore_label,
        aux_loss_weight=config.aux_loss_weight,
        skip_nonfinite=config.skip_nonfinite,
    )
    options = remat_compiler_options(config)
    parallel = config.get("parallel", "jit")
    if not config.adversarial:
        step = functools.partial(
            steps.train_step,
            **common,
            grad_accum=config.get("grad_accum", 1),
            loss_resolution=config.get("loss_resolution", "input"),
        )
        return _jit_step(step, mesh, options, parallel)
    return _jit_step(
        functools.partial(
            adversarial.train_step,
            **common,
            encoding=config.adversarial,
            num_classes=config.num_classes,
            adv_weight=config.adv_weight,
            adversary_updates=config.adv_updates,
            tau=config.adv_tau,
            adv_normalization=config.get("adv_normalization", "pixels"),
            input_stride=config.get("adv_input_stride", 1),
        ),
        mesh,
        options,
        parallel,
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
            input_stride=config.get("adv_input_stride", 1),
        ),
        mesh,
        parallel=config.get("parallel", "jit"),
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
    input_shape = (1, config.crop_size, config.crop_size, model.in_channels)

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
                    dtype=restore.DTYPES[config.dtype],
                    **config.adversary_kwargs.to_dict(),
                )
            )
        return state

    return jax.jit(create, out_shardings=replicated(mesh))(init_rng)


class NonFiniteError(ValueError):
    """The loss or a gradient stopped being finite (a diverging run)."""


def _last_good(manager, workdir) -> str:
    manager.reload()
    step = manager.latest_step()
    if step is None:
        return "no checkpoint was written before it."
    return (
        f"the last good checkpoint is step {step} in {checkpoints.checkpoint_dir(workdir)} "
        "(left untouched)."
    )


def _saved_meta(manager, steps) -> dict:
    """The metadata (model spec, config) of the newest checkpoint whose metadata reads (a
    damaged newest one is reported when the state is restored)."""
    for step in sorted(steps, reverse=True):
        try:
            return checkpoints.read_meta(manager, step)
        except Exception:  # damaged: the restore below names it
            continue
    raise ValueError(
        f"No checkpoint in {checkpoints.checkpoint_dir(manager.directory.parent)} has readable "
        "metadata; the workdir was left untouched: pass a new --workdir."
    )


def check_workdir(workdir: Path) -> None:
    """One sentence, before any set-up, for a workdir that cannot hold checkpoints."""
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"--workdir={workdir} is an existing file, not a directory.")
    existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--workdir={workdir} is not writable ({existing} is read-only).")


def check_disk_space(workdir: Path, state, keep: int) -> None:
    """Refuses to start when the disk cannot hold one more checkpoint (the state's size)."""
    needed = sum(x.nbytes for x in jax.tree.leaves(state_lib.state_to_checkpoint(state)))
    existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < 2 * needed:
        raise OSError(
            f"The disk holding --workdir={workdir} has {free / 2**20:.0f} MiB free, too little "
            f"for a {needed / 2**20:.0f} MiB checkpoint (keeping {keep} of them); free space "
            "or choose another --workdir."
        )


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
    check_workdir(workdir)
    manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints, read_only=True)
    saved_steps = manager.all_steps()
    latest = manager.latest_step()
    if latest is not None:
        saved_meta = _saved_meta(manager, saved_steps)
        checkpointing.check_compatible(saved_meta["model_spec"], spec, workdir)
        saved_dtype = saved_meta.get("config", {}).get("dtype", config.dtype)
        if saved_dtype != config.dtype:  # the compute dtype only: allowed, but said
            reporting.say(
                f"The checkpoint was trained with --config.dtype={saved_dtype}; resuming in "
                f"{config.dtype} (the compute dtype; the parameters stay {spec['param_dtype']})."
            )
    elif config.init_from:
        initialization.check_init_from(config.init_from, spec)
    spec_lib.check_input_channels(config.dataset, spec["in_channels"], "--model_kwargs sets")
    model = restore.build_model(  # checks its arguments
        spec, restore.DTYPES[config.dtype], remat=config.get("remat", False)
    )

    train_iterator = inputs.create_train_iterator(config)
    mesh = create_mesh()
    tx, schedule = create_optimizer(config)
    state = init_state(model, tx, config, mesh)
    reporting.say(f"Workdir: {workdir.absolute()} (checkpoints/, tensorboard/).")
    reporting.say(
        f"{config.model.name}: {models.count_params(state.params):,} parameters, "
        f"{jax.device_count()} device(s), global batch {config.batch_size}, loss {config.loss}"
    )
    if config.param_groups:
        groups = optim.param_groups(state.params, config.param_groups, config.weight_decay)
        reporting.say("Parameter groups:\n" + optim.describe_groups(groups))

    if latest is None and config.init_from:
        state = initialization.init_from(state, config.init_from, spec, mesh)
    if latest is None and config.pretrained:
        state = initialization.load_pretrained(state, config.pretrained, model, mesh)
    check_disk_space(workdir, state, config.keep_checkpoints)
    for unfinished in sorted(checkpoints.checkpoint_dir(workdir).glob("*.orbax-checkpoint-tmp-*")):
        reporting.say(
            f"Ignored {unfinished}: a save that never finished (the process died while writing "
            "it); it was left in place."
        )
    if latest is not None:
        damaged = []
        latest, restored = checkpoints.restore_intact(
            manager,
            saved_steps,
            state_lib.state_to_checkpoint(state),
            on_damaged=lambda step, message: (damaged.append(step), reporting.say(message)),
        )
        for step in damaged:  # newer than the restored one: move them out of the saves' way
            reporting.say(f"Moved it to {checkpointing.set_aside(workdir, step)}.")
        state = state_lib.state_from_checkpoint(state, restored["state"])
        inputs.restore_iterator(train_iterator, restored["data"])
        reporting.say(f"Resumed from {checkpoints.checkpoint_dir(workdir)} at step {latest}.")
    manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints)

    train_fn = jit_train_step(config, mesh)
    # The segmenter's optimiser (and schedule) only counts its own updates.
    pretrain_steps = config.adv_pretrain_steps if config.adversarial else 0
    pretrain_fn = jit_pretrain_step(config, mesh) if pretrain_steps else None
    eval_fn = evaluation.jit_eval_step(config.num_classes, config.ignore_label, mesh)

    replicas = config.get("parallel", "jit") == "pmap"

    def mesh_state(state):  # what checkpoints and the jitted evaluation take
        return sharding.from_replicas(state, mesh) if replicas else state

    def validate(state):
        confusion = evaluation.evaluate(
            mesh_state(state),
            inputs.create_eval_iterator(config),
            eval_fn,
            mesh,
            config.num_classes,
            progress=config.progress_bar,
        )
        return confusion, evaluation.summarize(confusion)

    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    writer = reporting.MetricWriter(workdir)
    meta = {"model_spec": spec, "config": config.to_dict()}

    start = int(jax.device_get(state.step))
    if replicas:
        state = sharding.to_replicas(state)
    summary, confusion, history = {}, None, []
    last_step = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    progress = reporting.progress_bar(config.steps, start, config.progress_bar)
    window, window_start = [], time.perf_counter()
    save = functools.partial(checkpointing.save, manager, meta=meta)
    saved_at, unchecked = start, []
    with preemption.stop_on_signals() as stop:
        for step in range(start + 1, last_step + 1):
            step_fn = pretrain_fn if step <= pretrain_steps else train_fn
            if replicas:
                batch = sharding.split_for_replicas(next(train_iterator))
                state, train_metrics = step_fn(state, batch, dropout_rng)
                train_metrics = jax.tree.map(lambda x: x[0], train_metrics)
            else:
                batch = shard_batch(next(train_iterator), mesh)
                state, train_metrics = step_fn(state, batch, dropout_rng)
            preemption.test_kill_point("mid_step", step)
            if "nonfinite" in train_metrics and not config.skip_nonfinite:
                unchecked.append((step, train_metrics["nonfinite"]))
            # The divergence flags are read back lazily (reading one every step would stall the
            # accelerator's queue), but always before anything is logged, evaluated or saved.
            if unchecked and (
                step % config.log_every == 0
                or step % config.eval_every == 0
                or step % config.checkpoint_every == 0
                or step == last_step
                or stop.requested
            ):
                diverged = [s for s, flag in jax.device_get(unchecked) if flag]
                unchecked = []
                if diverged:
                    progress is not None and progress.close()
                    raise NonFiniteError(
                        f"Training diverged at step {diverged[0]}: the loss or a gradient is not "
                        f"finite; {_last_good(manager, workdir)} Lower --lr, or pass "
                        "--config.skip_nonfinite=True to skip such updates."
                    )
            if window and set(train_metrics) != set(window[0]):  # pre-training ended
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
                    shown = {
                        k: f"{scalars[k]:.4f}" for k in ("loss", "adversary_loss") if k in scalars
                    }
                    progress.set_postfix(**shown, img_per_s=f"{scalars['images_per_second']:.1f}")
                window, window_start = [], time.perf_counter()
            if progress is not None:
                progress.update(1)

            evaluated = step % config.eval_every == 0 or step == last_step
            if evaluated and not stop.requested:
                confusion, summary = validate(state)
                writer.write_scalars(step, {f"val/{k}": v for k, v in summary.items()})
            if step % config.checkpoint_every == 0 or step == last_step or stop.requested:
                save(
                    step,
                    state=state_lib.state_to_checkpoint(mesh_state(state)),
                    data_state=inputs.iterator_state(train_iterator),
                    metrics={"miou": summary["miou"]} if evaluated and summary else None,
                )
                saved_at = step
                preemption.test_kill_point("after_save", step)
            if stop.requested:
                break
    if progress is not None:
        progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if stop.requested:
        where = checkpoints.checkpoint_dir(workdir)
        message = (
            f"Stopped by {stop.signal_name} at step {saved_at}; the checkpoint is in {where}. "
            "Run the same command to resume."
        )
        return {"step": saved_at, "preempted": True, "report": message, "history": history}
    if confusion is None:  # the run had already reached config.steps: report the saved model
        confusion, summary = validate(state)
    summary["step"] = int(np.ravel(jax.device_get(state.step))[0])  # pmap: one per replica
    summary["report"] = evaluation.format_report(
        confusion, restore.class_names(config.dataset, config.num_classes)
    )
    summary["history"] = history
    return summary
