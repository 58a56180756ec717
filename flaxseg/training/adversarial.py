"""Adversarial training of any segmenter (Luc, Couprie, Chintala & Verbeek, "Semantic
Segmentation using Adversarial Networks", NIPS 2016 workshop, arXiv:1611.08408).

An adversary a(x, y) tells ground-truth label maps y from the segmenter's softmax s(x), both
encoded by ``flaxseg.models.adversarial`` ('basic', 'product' or 'scaling'). Two pure updates
alternate on one state that holds both networks and both optimiser states
(``TrainState.adversary`` is the adversary's own TrainState):

  adversary:  minimise BCE(a(x, y), 1) + BCE(a(x, s(x)), 0), with s(x) held fixed
              (``jax.lax.stop_gradient``: nothing flows into the segmenter);
  segmenter:  minimise loss(s(x), y) + λ·BCE(a(x, s(x)), 1), the paper's "flipped",
              non-saturating form of −λ·BCE(a(x, s(x)), 0), with the adversary held fixed.

``pretrain_step`` trains the adversary alone against the current segmenter (the seed notes'
procedure: the adversarial network first, then the segmenter's adversarial fine-tuning);
``train_step`` runs ``adversary_updates`` adversary updates on the batch, then one segmenter
update. Both are ``(state, batch, rng) -> (state, metrics)`` with static shapes, jitted over the
mesh like the plain step, and take ``axis_name`` under ``jax.pmap``.
"""

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from flaxseg.models import adversarial as adversarial_models
from flaxseg.models.layers import AUX_COLLECTION
from flaxseg.training import steps


def _bce(logits, target: float):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def _segment(state, params, batch, rng, train: bool = True, axis_name=None):
    """The segmenter's logits and updated collections on the batch (train mode by default)."""
    with steps.batch_norm_context(axis_name):
        return state.apply_fn(
            steps.model_variables(params, state.batch_stats),
            batch["image"],
            train=train,
            mutable=["batch_stats", AUX_COLLECTION],
            rngs={"dropout": rng},
        )


def encoders(encoding: str, num_classes: int, ignore_label: int, tau: float):
    """``(real, fake)``: functions ``(batch, probs) -> adversary input`` for the encoding."""

    def real(batch, probs):
        return adversarial_models.real_input(
            batch["image"],
            batch["label"],
            probs,
            encoding=encoding,
            num_classes=num_classes,
            ignore_label=ignore_label,
            tau=tau,
        )

    def fake(batch, probs):
        return adversarial_models.fake_input(
            batch["image"], batch["label"], probs, encoding=encoding, ignore_label=ignore_label
        )

    return real, fake


def adversary_loss(adversary_params, apply_fn, batch, real_input, fake_input):
    """BCE(a(x, y), 1) + BCE(a(x, s(x)), 0) and the real and fake logits."""
    real_logits = apply_fn({"params": adversary_params}, batch["image"], real_input)
    fake_logits = apply_fn({"params": adversary_params}, batch["image"], fake_input)
    return _bce(real_logits, 1.0) + _bce(fake_logits, 0.0), (real_logits, fake_logits)


def fooling_loss(adversary_params, apply_fn, batch, fake_input):
    """The segmenter's adversarial term: BCE(a(x, s(x)), 1)."""
    return _bce(apply_fn({"params": adversary_params}, batch["image"], fake_input), 1.0)


def _adversary_update(state, batch, rng, real, fake, axis_name):
    """One adversary step against the segmenter's current prediction, held fixed."""
    # The segmenter's BatchNorm updates are dropped.
    logits, _ = _segment(state, state.params, batch, rng, axis_name=axis_name)
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
    adversary = state.adversary
    (loss, (real_logits, fake_logits)), grads = jax.value_and_grad(adversary_loss, has_aux=True)(
        adversary.params, adversary.apply_fn, batch, real(batch, probs), fake(batch, probs)
    )
    metrics = {
        "adversary_loss": loss,
        "adversary_accuracy_real": jnp.mean(real_logits > 0),
        "adversary_accuracy_fake": jnp.mean(fake_logits < 0),
    }
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    return state.replace(adversary=adversary.apply_gradients(grads=grads)), metrics


def pretrain_step(
    state,
    batch,
    rng,
    *,
    encoding: str,
    num_classes: int,
    ignore_label: int,
    tau: float = adversarial_models.DEFAULT_TAU,
    axis_name: Optional[str] = None,
):
    """One adversary update; the segmenter is untouched except for the step count."""
    step_rng = steps.step_rng(rng, state.step, axis_name)
    real, fake = encoders(encoding, num_classes, ignore_label, tau)
    state, metrics = _adversary_update(state, batch, step_rng, real, fake, axis_name)
    return state.replace(step=state.step + 1), metrics


def train_step(
    state,
    batch,
    rng,
    *,
    loss_fn: Callable,
    encoding: str,
    num_classes: int,
    ignore_label: int,
    adv_weight: float,
    aux_loss_weight: float = 0.4,
    adversary_updates: int = 1,
    tau: float = adversarial_models.DEFAULT_TAU,
    skip_nonfinite: bool = False,
    axis_name: Optional[str] = None,
):
    """``adversary_updates`` adversary updates, then one segmenter update with the adversarial
    term. Metrics: the plain step's (the loss terms, 'aux_loss', 'pixel_accuracy'; 'loss' is the
    optimised total) plus 'adversarial' (the segmenter's unweighted BCE(a(x, s(x)), 1)) and the
    last adversary update's 'adversary_loss', 'adversary_accuracy_real/_fake'."""
    step_rng = steps.step_rng(rng, state.step, axis_name)
    real, fake = encoders(encoding, num_classes, ignore_label, tau)
    adversary_metrics = {}
    for update in range(adversary_updates):
        state, adversary_metrics = _adversary_update(
            state, batch, jax.random.fold_in(step_rng, update + 1), real, fake, axis_name
        )
    adversary = state.adversary

    def adversarial_term(logits):
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return fooling_loss(adversary.params, adversary.apply_fn, batch, fake(batch, probs))

    state, metrics = steps.train_step(
        state,
        batch,
        rng,
        loss_fn=loss_fn,
        ignore_label=ignore_label,
        aux_loss_weight=aux_loss_weight,
        extra_loss=(adv_weight, adversarial_term, "adversarial"),
        skip_nonfinite=skip_nonfinite,
        axis_name=axis_name,
    )
    return state, {**metrics, **adversary_metrics}


def init_adversary(
    name: str, *, encoding: str, num_classes: int, input_shape, rng, tx, dtype=jnp.float32, **kwargs
):
    """The adversary's TrainState (params initialised for images of ``input_shape``)."""
    from flaxseg.training.state import TrainState

    module = adversarial_models.create_adversary(
        name, encoding=encoding, num_classes=num_classes, dtype=dtype, **kwargs
    )
    channels = adversarial_models.input_channels(encoding, num_classes)
    image = jnp.zeros(input_shape, jnp.float32)
    encoded = jnp.zeros((*input_shape[:3], channels), jnp.float32)
    params = module.init(rng, image, encoded)["params"]
    return TrainState.create(apply_fn=module.apply, params=params, tx=tx)
