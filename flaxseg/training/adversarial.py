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

The scale of λ (``adv_normalization``). The paper adds, per image, a cross-entropy *summed* over
the image's pixels to λ·BCE of that image (its Chainer reimplementation:
``softmax_cross_entropy(..., normalize=False)`` plus λ times the adversary's BCE). flaxseg's
cross-entropy is a mean over the batch's N non-ignored pixels, so an unscaled λ would weigh the
adversarial term about H·W times (~10⁵ at 321²) more than the paper's. With 'pixels' (the
default) the segmenter minimises

    mean-CE + λ·Σ_n BCE_n / N  =  (Σ_pixels CE + λ·Σ_n BCE_n) / N,

the paper's objective summed over the batch and divided by N: the same gradient direction, and
λ means what the paper's λ means (the learning rate absorbs the 1/N). N counts the labels that
are not ``ignore_label`` over the global batch (a ``psum`` under pmap), as the pixel-sum losses
do, so a pmapped step equals the single-device one. 'images' gives the old scale,
mean-CE + λ·mean_n BCE_n (λ relative to a per-pixel mean). The logged 'adversarial' metric is
mean_n BCE_n either way, unweighted; 'loss' is the optimised total.

The adversary's resolution (``input_stride``). With stride s > 1 the adversary sees the image,
the labels and the segmenter's logits sampled every s pixels from pixel (s − 1) // 2 on (the
label maps at the segmenter's output resolution, for a model whose logits were upsampled by s;
a sampled pixel keeps its label or its ignore mark), then encoded as above: 64× fewer pixels
for the VOC nets' s = 8. s = 1 is the full-resolution input of earlier flaxseg versions.

What the paper's defaults are, and how sure this is (``flaxseg.models.adversarial.PAPER_DEFAULTS``
holds them; ``config.adv_weight`` and ``config.adv_input_stride`` left unset take them):
  - λ per adversary: 1 for LargeFOV, LargeFOV-light and SmallFOV-light, 0.1 for SmallFOV, as the
    Chainer reimplementation's table lists them (``train.py``: ``(model, initmodel, lr,
    L_bce_weight)``); it pairs them with the summed cross-entropy above. Not confirmed in the
    paper's own text, which could not be read here beyond its abstract and introduction. The
    Stanford Background net's λ is in neither reimplementation read; 1 is our choice.
  - The adversary's input resolution: not confirmed in the paper's text. A TensorFlow
    reimplementation resizes the labels and the image to the segmenter's logits (before
    their upsampling) and feeds those to the adversary; the Chainer one feeds FCN's
    full-resolution output. The paper's fields of view (34×34 for LargeFOV, 18×18 for
    SmallFOV) only make a "large" field on a map of Dilated-8's 1/8 resolution (~40×40 for a
    321² crop), so the VOC nets default to stride 8, and the Stanford net to 4 (its segmenter,
    Farabet et al.'s, emits quarter-resolution maps). An inference, not a quotation.
  - Pre-training the adversary: not confirmed. Neither reimplementation pre-trains it (the
    Chainer one can load a saved adversary; the TensorFlow one alternates 500 adversary and 500
    segmenter steps from the start), so ``adv_pretrain_steps`` defaults to 0.
  - Optimisers: not confirmed. The Chainer reimplementation trains both networks with momentum
    SGD (0.99, weight decay 5e-4); the TensorFlow one offers Adagrad, SGD or Adam and searched
    the rates. Adam 1e-4 for the adversary (``config.adv_optimizer``, ``config.adv_lr``) is
    our choice.

``pretrain_step`` trains the adversary alone against the current segmenter (the adversarial
network first, then the segmenter's adversarial fine-tuning); ``train_step`` runs
``adversary_updates`` adversary updates on the batch, then one segmenter update. Both are
``(state, batch, rng) -> (state, metrics)`` with static shapes, jitted over the mesh like the
plain step, and take ``axis_name`` under ``jax.pmap``.
"""

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from flaxseg.models import adversarial as adversarial_models
from flaxseg.models.layers import AUX_COLLECTION
from flaxseg.training import steps

NORMALIZATIONS = ("pixels", "images")


def _bce(logits, target: float):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def adversary_view(batch, logits, input_stride: int = 1):
    """``(batch, logits)`` as the adversary sees them: every ``input_stride``-th row and column
    from (stride − 1) // 2 on (image, labels and logits alike), or unchanged for stride 1."""
    if input_stride == 1:
        return batch, logits
    start = (input_stride - 1) // 2

    def sample(x):
        return x[:, start::input_stride, start::input_stride]

    return {"image": sample(batch["image"]), "label": sample(batch["label"])}, sample(logits)


def adversarial_weight(
    adv_weight: float,
    labels,
    *,
    ignore_label: int,
    normalization: str = "pixels",
    axis_name: Optional[str] = None,
):
    """The weight of mean_n BCE_n in the segmenter's total: λ·B/N for 'pixels' (B images and N
    non-ignored labels of the global batch, so the term is λ·Σ_n BCE_n / N), λ for 'images'."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"adv_normalization={normalization!r} is not one of {', '.join(NORMALIZATIONS)}."
        )
    if normalization == "images":
        return adv_weight
    images = labels.shape[0]
    pixels = jnp.sum(labels != ignore_label).astype(jnp.float32)
    if axis_name is not None:
        images = images * jax.lax.axis_size(axis_name)
        pixels = jax.lax.psum(pixels, axis_name)
    return adv_weight * images / jnp.maximum(pixels, 1.0)


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


def _adversary_update(state, batch, rng, real, fake, axis_name, input_stride=1):
    """One adversary step against the segmenter's current prediction, held fixed."""
    # The segmenter's BatchNorm updates are dropped.
    logits, _ = _segment(state, state.params, batch, rng, axis_name=axis_name)
    batch, logits = adversary_view(batch, logits, input_stride)
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
    input_stride: int = 1,
    axis_name: Optional[str] = None,
):
    """One adversary update; the segmenter is untouched except for the step count."""
    step_rng = steps.step_rng(rng, state.step, axis_name)
    real, fake = encoders(encoding, num_classes, ignore_label, tau)
    state, metrics = _adversary_update(state, batch, step_rng, real, fake, axis_name, input_stride)
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
    adv_normalization: str = "pixels",
    input_stride: int = 1,
    skip_nonfinite: bool = False,
    axis_name: Optional[str] = None,
):
    """``adversary_updates`` adversary updates, then one segmenter update with the adversarial
    term, λ = ``adv_weight`` on the ``adv_normalization`` scale (module docstring), the adversary
    seeing maps sampled every ``input_stride`` pixels. Metrics: the plain step's (the loss
    terms, 'aux_loss', 'pixel_accuracy'; 'loss' is the optimised total) plus 'adversarial' (the
    segmenter's unweighted mean BCE(a(x, s(x)), 1)) and the last adversary update's
    'adversary_loss', 'adversary_accuracy_real/_fake'."""
    step_rng = steps.step_rng(rng, state.step, axis_name)
    real, fake = encoders(encoding, num_classes, ignore_label, tau)
    weight = adversarial_weight(
        adv_weight,
        batch["label"],
        ignore_label=ignore_label,
        normalization=adv_normalization,
        axis_name=axis_name,
    )
    adversary_metrics = {}
    for update in range(adversary_updates):
        state, adversary_metrics = _adversary_update(
            state,
            batch,
            jax.random.fold_in(step_rng, update + 1),
            real,
            fake,
            axis_name,
            input_stride,
        )
    adversary = state.adversary

    def adversarial_term(logits):
        view, logits = adversary_view(batch, logits, input_stride)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return fooling_loss(adversary.params, adversary.apply_fn, view, fake(view, probs))

    state, metrics = steps.train_step(
        state,
        batch,
        rng,
        loss_fn=loss_fn,
        ignore_label=ignore_label,
        aux_loss_weight=aux_loss_weight,
        extra_loss=(weight, adversarial_term, "adversarial"),
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
