"""Pure train and eval steps: `(state, batch, rng) -> (state, metrics)`.

No host I/O, no Python side effects, static shapes, so each jits once. The same functions run
    * under `jax.jit` on a device mesh with the batch sharded along 'data' (the main path): the
      loss is a mean over the global batch, so gradients and BatchNorm batch statistics are
      global by construction;
    * under `jax.pmap(..., axis_name=...)`, given `axis_name`: gradients, BatchNorm running
      statistics and metrics are averaged (the confusion matrix summed) over that axis.
Configuration (the loss function, ignore label, auxiliary-loss weight, class count) is bound with
functools.partial before jitting; nothing is read from a global.
"""

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from flaxseg import metrics as metrics_lib
from flaxseg.models.layers import AUX_COLLECTION


def model_variables(params, batch_stats):
    """The variables dict `apply` takes: params, plus BatchNorm statistics if the model has any."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def step_rng(rng, step, axis_name: Optional[str] = None):
    """The dropout key of one step: the run's key folded with the step number (and the device
    index under pmap), so a resumed run draws the same masks as an uninterrupted one."""
    rng = jax.random.fold_in(rng, step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    return rng


def train_step(
    state,
    batch,
    rng,
    *,
    loss_fn: Callable,
    ignore_label: int,
    aux_loss_weight: float = 0.4,
    extra_loss: Optional[tuple[float, Callable, str]] = None,
    skip_nonfinite: bool = False,
    axis_name: Optional[str] = None,
):
    """One SGD step on `batch = {'image': [B,H,W,3] float, 'label': [B,H,W] int}`.

    `loss_fn(logits, labels) -> (total, {name: term})` is the configured loss
    (`flaxseg.training.losses.build_loss`); auxiliary logits that a model sows into the 'aux'
    collection add `aux_loss_weight` × the same loss of each. Metrics: 'loss' (the optimised
    total), one entry per loss term of the main output (named after the loss, e.g.
    'cross_entropy', 'dice'), 'aux_loss' and 'pixel_accuracy'.
    `extra_loss = (weight, fn, name)` adds weight × fn(logits) to the total and reports the
    unweighted fn(logits) as metric `name` (the adversarial term, flaxseg.training.adversarial).
    `rng` is the run's base dropout key (see `step_rng`).
    Metric 'nonfinite' is 1 when the loss or a gradient is not finite. With `skip_nonfinite`
    such an update is dropped (parameters, BatchNorm statistics and optimiser state keep their
    values; the step count advances); without it the loop stops the run.
    """
    dropout_rng = step_rng(rng, state.step, axis_name)

    def objective(params):
        logits, updates = state.apply_fn(
            model_variables(params, state.batch_stats),
            batch["image"],
            train=True,
            mutable=["batch_stats", AUX_COLLECTION],
            rngs={"dropout": dropout_rng},
        )
        main_loss, terms = loss_fn(logits, batch["label"])
        aux_losses = [
            loss_fn(aux, batch["label"])[0]
            for aux in jax.tree.leaves(updates.get(AUX_COLLECTION, {}))
        ]
        aux_loss = sum(aux_losses) if aux_losses else jnp.zeros((), jnp.float32)
        total = main_loss + aux_loss_weight * aux_loss
        if extra_loss is not None:
            weight, extra_fn, name = extra_loss
            terms = {**terms, name: extra_fn(logits)}
            total = total + weight * terms[name]
        return total, (updates.get("batch_stats", state.batch_stats), logits, terms, aux_loss)

    (total, (batch_stats, logits, terms, aux_loss)), grads = jax.value_and_grad(
        objective, has_aux=True
    )(state.params)
    valid = batch["label"] != ignore_label
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & valid)
    metrics = {
        "loss": total,
        **terms,
        "aux_loss": aux_loss,
        "pixel_accuracy": correct / jnp.maximum(valid.sum(), 1),
    }
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    finite = jnp.isfinite(metrics["loss"]) & jnp.all(
        jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if skip_nonfinite:
        kept = state.replace(step=updated.step)
        updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)
    return updated, metrics


def eval_step(
    state, batch, *, num_classes: int, ignore_label: int, axis_name: Optional[str] = None
):
    """Confusion matrix [num_classes, num_classes] of the batch (summed over `axis_name` if
    given)."""
    logits = state.apply_fn(
        model_variables(state.params, state.batch_stats), batch["image"], train=False
    )
    predictions = jnp.argmax(logits, axis=-1)
    confusion = metrics_lib.confusion_matrix(batch["label"], predictions, num_classes, ignore_label)
    if axis_name is not None:
        confusion = jax.lax.psum(confusion, axis_name)
    return confusion
