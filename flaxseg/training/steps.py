"""Pure train and eval steps: `(state, batch, rng) -> (state, metrics)`.

No host I/O, no Python side effects, static shapes, so each jits once. The same functions run
    * under `jax.jit` on a device mesh with the batch sharded along 'data' (the main path): the
      loss is a mean over the global batch, so gradients and BatchNorm batch statistics are
      global by construction;
    * under `jax.pmap(..., axis_name=...)`, given `axis_name`: the loss is that of the global
      batch (pixel sums and counts added over the axis; other losses computed on the gathered
      logits), gradients are summed over the axis and BatchNorm computes its batch statistics
      over it (SyncBN), so the update equals the mesh path's; the confusion matrix is summed.
`grad_accum=N` splits each device's batch into N micro-batches, one forward and backward pass
each, whose gradients add up to those of the whole batch (`train_step`).
`loss_resolution='score_map'` takes the losses at the resolution of the model's score maps
(Caffe DeepLab v1/v2) instead of on logits upsampled to the input's size (`train_step`).
Configuration (the loss function, ignore label, auxiliary-loss weight, class count) is bound with
functools.partial before jitting; nothing is read from a global.
"""

import contextlib
from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg import metrics as metrics_lib
from flaxseg.models.layers import AUX_COLLECTION, score_map_outputs, synchronized_batch_norm

# Where the training losses are taken: 'input' on the model's output at the input's size (the
# default; torchvision, MMSegmentation, TF DeepLab), 'score_map' on its score maps before the
# final upsampling, against labels shrunk to their size (Caffe DeepLab v1/v2, `shrink_labels`).
LOSS_RESOLUTIONS = ("input", "score_map")


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


def batch_norm_context(axis_name: Optional[str]):
    """SyncBN over `axis_name` under pmap (`layers.synchronized_batch_norm`); else nothing."""
    if axis_name is None:
        return contextlib.nullcontext()
    return synchronized_batch_norm(axis_name)


def _shrink_indices(in_size: int, out_size: int) -> np.ndarray:
    # Caffe Interp's sample positions i·(in − 1)/(out − 1) (corners aligned), rounded half up;
    # integer arithmetic so that exact positions stay exact.
    if out_size == 1:
        return np.zeros(1, np.int32)
    i = np.arange(out_size)
    return ((2 * i * (in_size - 1) + (out_size - 1)) // (2 * (out_size - 1))).astype(np.int32)


def shrink_labels(labels: jax.Array, size) -> jax.Array:
    """Labels [B, H, W] shrunk to ``size`` (h, w) by nearest sampling at Caffe ``Interp``'s
    positions: row i takes input row i·(H − 1)/(h − 1), rounded (corners aligned).

    DeepLab's released Caffe nets (v1 LargeFOV and v2 ``train.prototxt``: a ``label_shrink``
    ``Interp`` layer, ``shrink_factor: 8``, giving (H − 1)/8 + 1 rows: 321 -> 41) compute the
    loss on labels shrunk this way to the stride-8 score map. Interp interpolates bilinearly
    with aligned corners; where (H − 1)/(h − 1) is an integer (321 -> 41: every 8th pixel, from
    pixel 0) every position is a pixel and bilinear sampling is exactly this nearest sampling.
    Elsewhere Caffe would blend label *values* (meaningless for class ids, and 255 with a class
    truncates to another id); nearest sampling is the sound reading of it. (From the released
    prototxts as described in the DeepLab papers and issue 22; the deeplab-public files were
    not re-read in this change.)"""
    rows = _shrink_indices(labels.shape[1], int(size[0]))
    cols = _shrink_indices(labels.shape[2], int(size[1]))
    return labels[:, rows][:, :, cols]


def _labels_at(labels: jax.Array, size) -> jax.Array:
    return labels if tuple(labels.shape[1:3]) == tuple(size) else shrink_labels(labels, size)


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B, ...] → [grad_accum, B / grad_accum, ...]; micro-batch m holds rows m, m + N, …, so
    that on a mesh every device keeps an equal share of every micro-batch."""
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
        batch,
    )


class _LossShares:
    """Each part's (device's, micro-batch's) share of the loss of the whole global batch.

    A share's value is such that the shares of all parts add up to the global loss, and its
    gradient is this part's contribution to the global loss's gradient; so summing the parts'
    gradients (over micro-batches, then psum over devices) gives the global batch's gradient.
    Pixel-sum losses (`losses.PIXEL_SUMS`) divide this part's sums by the counts of the whole
    batch (exact). Other losses (Dice, Lovász, OHEM) are computed under pmap on the logits
    gathered over the axis (exact), and per micro-batch, averaged (not the whole batch's).
    """

    def __init__(self, loss_fn, labels, axis_name, parts):
        self.loss_fn, self.axis_name, self.parts = loss_fn, axis_name, parts
        self.devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
        self.sums = getattr(loss_fn, "pixel_sums", None)
        self.denominators = None
        if self.sums is not None and (parts > 1 or axis_name is not None):
            self.denominators = self.sums.denominators(labels)
            if axis_name is not None:
                self.denominators = jax.lax.psum(self.denominators, axis_name)

    def __call__(self, logits, labels):
        if self.denominators is not None:
            return self.sums.combine(self.sums.numerators(logits, labels), self.denominators)
        if self.axis_name is None:
            total, terms = self.loss_fn(logits, labels)
            return jax.tree.map(lambda v: v / self.parts, (total, terms))
        gathered = jax.lax.all_gather(jax.lax.stop_gradient(logits), self.axis_name, tiled=True)
        start = jax.lax.axis_index(self.axis_name) * logits.shape[0]
        gathered = jax.lax.dynamic_update_slice_in_dim(gathered, logits, start, axis=0)
        labels = jax.lax.all_gather(labels, self.axis_name, tiled=True)
        scale = 1.0 - 1.0 / (self.devices * self.parts)
        # value: 1/(devices·parts) of the loss; gradient: this device's rows' contribution.
        return jax.tree.map(
            lambda v: v - jax.lax.stop_gradient(v) * scale, self.loss_fn(gathered, labels)
        )

    def mean(self, value):
        """The share of a per-part mean over equal-sized parts (the adversarial term)."""
        return value / (self.devices * self.parts)


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
    grad_accum: int = 1,
    loss_resolution: str = "input",
):
    """One SGD step on `batch = {'image': [B,H,W,3] float, 'label': [B,H,W] int}`.

    `loss_fn(logits, labels) -> (total, {name: term})` is the configured loss
    (`flaxseg.losses.build_loss`); auxiliary logits that a model sows into the 'aux'
    collection add `aux_loss_weight` × the same loss of each. Metrics: 'loss' (the optimised
    total), one entry per loss term of the main output (named after the loss, e.g.
    'cross_entropy', 'dice'), 'aux_loss' and 'pixel_accuracy'.
    `extra_loss = (weight, fn, name)` adds weight × fn(logits) to the total and reports the
    unweighted fn(logits) as metric `name` (the adversarial term, flaxseg.training.adversarial).
    `rng` is the run's base dropout key (see `step_rng`).
    `grad_accum = N` (dividing the batch) runs N micro-batches of B/N rows one after another and
    adds their gradients: for pixel-sum losses (cross-entropy, focal) the loss, its gradient and
    the metrics equal the whole batch's, in 1/N of the activation memory; BatchNorm normalises
    each micro-batch with its own statistics and its running statistics move by their mean.
    Metric 'nonfinite' is 1 when the loss or a gradient is not finite. With `skip_nonfinite`
    such an update is dropped (parameters, BatchNorm statistics and optimiser state keep their
    values; the step count advances); without it the loop stops the run.
    `loss_resolution='score_map'` applies the model inside `layers.score_map_outputs()`: the
    main and auxiliary logits stay at their score maps' resolution (DeepLab v1/v2: stride 8),
    and every loss and the pixel accuracy are taken there, against the labels shrunk to each
    map's size (`shrink_labels`), as Caffe's DeepLab trains. 'input' (default): on the logits
    at the input's size.
    """
    assert loss_resolution in LOSS_RESOLUTIONS, loss_resolution
    dropout_rng = step_rng(rng, state.step, axis_name)

    def forward(params, part, part_rng):
        with contextlib.ExitStack() as stack:
            stack.enter_context(batch_norm_context(axis_name))
            if loss_resolution == "score_map":
                stack.enter_context(score_map_outputs())
            return state.apply_fn(
                model_variables(params, state.batch_stats),
                part["image"],
                train=True,
                mutable=["batch_stats", AUX_COLLECTION],
                rngs={"dropout": part_rng},
            )

    sizes = {tuple(batch["label"].shape[1:3])}
    if loss_resolution == "score_map":  # the sizes of the maps the losses are taken on
        part = jax.tree.map(lambda x: x[: x.shape[0] // grad_accum], batch)
        logits, updates = jax.eval_shape(forward, state.params, part, dropout_rng)
        outputs = (logits, updates.get(AUX_COLLECTION, {}))
        sizes = {tuple(x.shape[1:3]) for x in jax.tree.leaves(outputs)}
    # Each size's shares of the loss, with the whole batch's denominators at that size.
    shares_at = {
        size: _LossShares(loss_fn, _labels_at(batch["label"], size), axis_name, grad_accum)
        for size in sizes
    }

    def objective(params, part, part_rng):
        logits, updates = forward(params, part, part_rng)
        shares = shares_at[tuple(logits.shape[1:3])]
        labels = _labels_at(part["label"], logits.shape[1:3])
        main_loss, terms = shares(logits, labels)
        aux_losses = [
            shares_at[tuple(aux.shape[1:3])](aux, _labels_at(part["label"], aux.shape[1:3]))[0]
            for aux in jax.tree.leaves(updates.get(AUX_COLLECTION, {}))
        ]
        aux_loss = sum(aux_losses) if aux_losses else jnp.zeros((), jnp.float32)
        total = main_loss + aux_loss_weight * aux_loss
        if extra_loss is not None:
            weight, extra_fn, name = extra_loss
            terms = {**terms, name: shares.mean(extra_fn(logits))}
            total = total + weight * terms[name]
        valid = labels != ignore_label
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid)
        sums = {
            "loss": total,
            **terms,
            "aux_loss": aux_loss,
            "correct": correct,
            "valid": valid.sum(),
        }
        return total, (updates.get("batch_stats", state.batch_stats), sums)

    gradient = jax.value_and_grad(objective, has_aux=True)
    if grad_accum == 1:
        (_, (batch_stats, sums)), grads = gradient(state.params, batch, dropout_rng)
    else:

        def accumulate(carry, inputs):
            part, index = inputs
            (_, (part_stats, part_sums)), part_grads = gradient(
                state.params, part, jax.random.fold_in(dropout_rng, index)
            )
            return jax.tree.map(jnp.add, carry, (part_grads, part_stats, part_sums)), None

        shapes = jax.eval_shape(
            lambda: gradient(state.params, jax.tree.map(lambda x: x[:1], batch), dropout_rng)
        )
        (_, (stats_shape, sums_shape)), grads_shape = shapes
        zeros = jax.tree.map(
            lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, stats_shape, sums_shape)
        )
        (grads, batch_stats, sums), _ = jax.lax.scan(
            accumulate,
            zeros,
            (split_micro_batches(batch, grad_accum), jnp.arange(grad_accum)),
        )
        batch_stats = jax.tree.map(lambda x: x / grad_accum, batch_stats)
    if axis_name is not None:  # BatchNorm statistics are already global (SyncBN)
        grads, sums = jax.lax.psum((grads, sums), axis_name)
    correct, valid = sums.pop("correct"), sums.pop("valid")
    metrics = {**sums, "pixel_accuracy": correct / jnp.maximum(valid, 1)}
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
