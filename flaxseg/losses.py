"""Segmentation losses as pure array functions, a registry of them, and loss expressions.

Every loss takes `logits` float [B, H, W, C] and `labels` int [B, H, W] and returns a scalar.
Logits are computed in at least float32 (bfloat16/float16 are upcast; float64 stays float64).
Pixels whose label equals `ignore_label` count nowhere: not in any sum, not in any
normalisation, not in any "class present" test, and they get zero gradient. `class_weights`
(length C, or None) weights classes as each loss's docstring says; weights of all ones give
the same value as None.

    LOSSES['dice'](logits, labels, ignore_label=255)
    loss_fn = build_loss('cross_entropy+0.5*dice', num_classes=21)
    total, terms = loss_fn(logits, labels)     # terms = {'cross_entropy': ..., 'dice': ...}

`build_loss` takes the expression given as `--config.loss`: terms `name` or `weight*name`
joined by `+`, e.g. `'0.7*ohem_cross_entropy + 0.3*lovasz'`.
"""

import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from flaxseg.constants import IGNORE_LABEL

# ----------------------------------------------------------------------------- helpers


def _prepare(logits, labels, ignore_label, class_weights):
    """Flattens to pixels: (logits [P, C] float>=32, valid [P] bool, safe labels [P], weights).

    `safe_labels` replaces ignored labels by 0 so that they can index arrays; every use is
    masked by `valid`. `weights` is a [C] array (ones when `class_weights` is None).
    """
    num_classes = logits.shape[-1]
    assert labels.shape == logits.shape[:-1], (labels.shape, logits.shape)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.reshape(-1, num_classes).astype(dtype)
    labels = labels.reshape(-1)
    valid = labels != ignore_label
    safe_labels = jnp.where(valid, labels, 0)
    if class_weights is None:
        weights = jnp.ones((num_classes,), dtype)
    else:
        weights = jnp.asarray(class_weights, dtype)
        assert weights.shape == (num_classes,), (weights.shape, num_classes)
    return logits, valid, safe_labels, weights


def _safe_divide(numerator, denominator):
    """numerator / denominator, and 0 where the denominator is 0 (with a finite gradient)."""
    nonzero = denominator > 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def _weighted_pixel_cross_entropy(log_probs, safe_labels, weights, label_smoothing):
    """Per-pixel (numerator, denominator) of PyTorch's weighted, label-smoothed cross-entropy.

    numerator = (1 - ε)·w[y]·(−log p_y) + (ε / C)·Σ_c w[c]·(−log p_c), denominator = w[y].
    """
    num_classes = log_probs.shape[-1]
    nll = -jnp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]
    pixel_weight = weights[safe_labels]
    numerator = (1.0 - label_smoothing) * pixel_weight * nll
    if label_smoothing:
        smooth = -jnp.sum(log_probs * weights, axis=-1)
        numerator = numerator + (label_smoothing / num_classes) * smooth
    return numerator, pixel_weight


# ----------------------------------------------------------------------------- losses


def cross_entropy(
    logits,
    labels,
    *,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
):
    """Softmax cross-entropy averaged over the valid pixels.

    Without class weights: mean over valid pixels of −Σ_c t_c·log p_c with the smoothed target
    t = (1 − ε)·onehot(y) + ε/C (optax's `smooth_labels` semantics, ε = `label_smoothing`).
    With class weights w: Σ_i [(1 − ε)·w[y_i]·(−log p_{i,y_i}) + (ε/C)·Σ_c w[c]·(−log p_{i,c})]
    / Σ_i w[y_i] over valid pixels i, which is exactly PyTorch's
    `F.cross_entropy(weight=w, ignore_index=..., label_smoothing=ε, reduction='mean')`
    (for ε = 0: Σ w[y]·ce / Σ w[y]). Returns 0 when no pixel is valid (PyTorch gives NaN).
    """
    return _safe_divide(
        cross_entropy_sum(
            logits,
            labels,
            ignore_label=ignore_label,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
        ),
        cross_entropy_count(labels, ignore_label=ignore_label, class_weights=class_weights),
    )


def cross_entropy_sum(
    logits,
    labels,
    *,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
):
    """The numerator of `cross_entropy`: its weighted sum over the valid pixels."""
    logits, valid, safe_labels, weights = _prepare(logits, labels, ignore_label, class_weights)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    numerator, _ = _weighted_pixel_cross_entropy(log_probs, safe_labels, weights, label_smoothing)
    return jnp.sum(numerator * valid)


def cross_entropy_count(
    labels, *, ignore_label: int = IGNORE_LABEL, class_weights: Sequence[float] | None = None
):
    """The denominator of `cross_entropy`: Σ w[y] over the valid pixels (their number when
    unweighted). It depends on the labels only."""
    valid = labels != ignore_label
    if class_weights is None:
        return jnp.sum(valid).astype(jnp.result_type(float))
    weights = jnp.asarray(class_weights, jnp.result_type(float))
    return jnp.sum(weights[jnp.where(valid, labels, 0)] * valid)


def ohem_cross_entropy(
    logits,
    labels,
    *,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
    thresh: float = 0.7,
    min_kept: int = 100000,
    label_smoothing: float = 0.0,
):
    """Cross-entropy over the hard pixels chosen by online hard example mining (OHEM).

    Pixel selection is MMSegmentation's `OHEMPixelSampler` (with `thresh` set): among the n
    valid pixels, p = softmax probability of the ground-truth class; with p sorted ascending
    and k = `min_kept`·B (mmseg's `min_kept` is per image), threshold = max(`thresh`,
    p_sorted[min(k, n − 1)]) (0-based index: however confident the model is, the min(k, n − 1)
    least confident pixels are kept, barring ties); a valid pixel is kept when p < threshold.
    The selection carries no gradient. The loss is `cross_entropy` (same class-weight and
    `label_smoothing` semantics, e.g. Σ w[y]·ce / Σ w[y]) over the kept pixels, 0 when none is
    kept.

    Difference from mmseg: mmseg's decode head multiplies the unreduced cross-entropy by the
    0/1 selection and divides by B·H·W (ignored and unselected pixels included); here the mean
    is over the kept pixels only, so the loss scale does not depend on how many are dropped.

    `min_kept`·B uses the batch this function sees: the global batch under `jax.jit` on a mesh,
    the per-device batch under `jax.pmap`. Static shapes: ignored pixels are sorted last
    (p := +inf) rather than removed.
    """
    logits, valid, safe_labels, weights = _prepare(logits, labels, ignore_label, class_weights)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    numerator, denominator = _weighted_pixel_cross_entropy(
        log_probs, safe_labels, weights, label_smoothing
    )

    batch_size = labels.shape[0] if labels.ndim else 1
    true_prob = jax.lax.stop_gradient(
        jnp.exp(jnp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0])
    )
    sorted_prob = jnp.sort(jnp.where(valid, true_prob, jnp.inf))
    num_valid = jnp.sum(valid)
    kth = jnp.clip(jnp.minimum(min_kept * batch_size, num_valid - 1), 0, None)
    threshold = jnp.maximum(jnp.where(num_valid > 0, sorted_prob[kth], 0.0), thresh)
    kept = valid & (true_prob < threshold)
    return _safe_divide(jnp.sum(numerator * kept), jnp.sum(denominator * kept))


def dice(
    logits,
    labels,
    *,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
    smooth: float = 0.0,
    eps: float = 1e-7,
):
    """Soft Dice loss (Milletari et al. 2016, V-Net), averaged over classes.

    For each class c, over the valid pixels of the whole batch, with p = softmax probabilities
    and t = one-hot labels: I_c = Σ p_c·t_c, dice_c = (I_c + smooth) / max((Σ p_c + Σ t_c)/2
    + smooth, eps), loss_c = 1 − dice_c, and loss_c := 0 for a class absent from the valid
    labels. The result is mean_c loss_c over all C classes (absent ones count as 0), or with
    class weights Σ_c w[c]·loss_c / Σ_c w[c] (over all classes, absent ones included).

    Equal to `segmentation_models_pytorch.losses.DiceLoss(mode='multiclass', from_logits=True,
    ignore_index=ignore_label, smooth=smooth, eps=eps, class_weights=class_weights)`.
    """
    logits, valid, safe_labels, weights = _prepare(logits, labels, ignore_label, class_weights)
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1) * valid[:, None]
    target = jax.nn.one_hot(safe_labels, num_classes, dtype=probs.dtype) * valid[:, None]
    intersection = jnp.sum(probs * target, axis=0)
    prob_sum = jnp.sum(probs, axis=0)
    target_sum = jnp.sum(target, axis=0)
    score = (intersection + smooth) / jnp.maximum(0.5 * (prob_sum + target_sum) + smooth, eps)
    per_class = (1.0 - score) * (target_sum > 0)
    return _safe_divide(jnp.sum(weights * per_class), jnp.sum(weights))


def lovasz(
    logits,
    labels,
    *,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
):
    """Lovász-softmax loss (Berman et al. 2018), the convex surrogate of the Jaccard index.

    Over all valid pixels of the batch (not per image), for each class c present among the
    valid labels: errors e = |fg_c − p_c| sorted descending, and loss_c = Σ_i e_(i)·g_i where
    g is the gradient of the Lovász extension of the Jaccard loss at the sorted foreground
    indicator (Alg. 1 of the paper). The result is the mean of loss_c over present classes, or
    with class weights Σ_present w[c]·loss_c / Σ_present w[c] (0 when that sum is 0).

    Equal to `segmentation_models_pytorch.losses.LovaszLoss(mode='multiclass', per_image=False,
    ignore_index=ignore_label)` (classes='present').
    """
    logits, valid, safe_labels, weights = _prepare(logits, labels, ignore_label, class_weights)
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1).T  # [C, P]
    foreground = (jax.nn.one_hot(safe_labels, num_classes, dtype=probs.dtype) * valid[:, None]).T
    # smp drops ignored pixels; for static shapes they stay, with error 0 and foreground 0.
    # That gives the same value: errors are >= 0, so every pixel with a positive error sorts
    # before all ignored ones and its cumulative foreground/background counts (hence its g_i)
    # are those of the valid pixels alone; gts = Σ fg is unchanged; pixels with error 0 add
    # 0·g_i whatever g_i is. Ties do not matter either: within a block of equal errors e the
    # block adds e·(J_last − J_before), which depends only on the block's counts, not its order.
    errors = jnp.where(valid[None, :], jnp.abs(foreground - probs), 0.0)
    order = jnp.argsort(-jax.lax.stop_gradient(errors), axis=-1)
    errors_sorted = jnp.take_along_axis(errors, order, axis=-1)
    foreground_sorted = jnp.take_along_axis(foreground, order, axis=-1)
    num_foreground = jnp.sum(foreground, axis=-1, keepdims=True)
    intersection = num_foreground - jnp.cumsum(foreground_sorted, axis=-1)
    union = num_foreground + jnp.cumsum(1.0 - foreground_sorted, axis=-1)  # >= 1 everywhere
    jaccard = 1.0 - intersection / union
    lovasz_grad = jnp.concatenate([jaccard[:, :1], jnp.diff(jaccard, axis=-1)], axis=-1)
    per_class = jnp.sum(errors_sorted * lovasz_grad, axis=-1)
    present_weights = weights * (num_foreground[:, 0] > 0)
    return _safe_divide(jnp.sum(present_weights * per_class), jnp.sum(present_weights))


def focal(
    logits,
    labels,
    *,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
    gamma: float = 2.0,
):
    """Focal loss (Lin et al. 2017) as segmentation_models_pytorch computes it for multiclass.

    Note the semantics: not a softmax focal loss but C one-vs-all *sigmoid* focal losses on the
    raw logits. For class c and valid pixel i, with x = logits[i, c], t = [y_i == c],
    bce = −t·log σ(x) − (1 − t)·log(1 − σ(x)) and p_t = exp(−bce): fl_{i,c} = (1 − p_t)^γ·bce
    (no α balancing). loss_c = mean of fl_{i,c} over valid pixels; the result is mean_c loss_c
    over all C classes, or with class weights Σ_c w[c]·loss_c / Σ_c w[c]. Returns 0 when no
    pixel is valid (smp gives NaN).

    Equal to `segmentation_models_pytorch.losses.FocalLoss(mode='multiclass', gamma=gamma,
    ignore_index=ignore_label, class_weights=class_weights)` (alpha None, normalized False,
    reduction 'mean').
    """
    return _safe_divide(
        focal_sum(
            logits, labels, ignore_label=ignore_label, class_weights=class_weights, gamma=gamma
        ),
        focal_count(labels, ignore_label=ignore_label),
    )


def focal_sum(
    logits,
    labels,
    *,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
    gamma: float = 2.0,
):
    """The numerator of `focal`: Σ_c w[c]·Σ_i fl_{i,c} / Σ_c w[c] over the valid pixels i."""
    logits, valid, safe_labels, weights = _prepare(logits, labels, ignore_label, class_weights)
    num_classes = logits.shape[-1]
    target = jax.nn.one_hot(safe_labels, num_classes, dtype=logits.dtype)
    bce = optax.sigmoid_binary_cross_entropy(logits, target)
    one_minus_pt = -jnp.expm1(-bce)
    per_pixel = one_minus_pt**gamma * bce
    per_class = jnp.sum(per_pixel * valid[:, None], axis=0)
    return _safe_divide(jnp.sum(weights * per_class), jnp.sum(weights))


def focal_count(labels, *, ignore_label: int = IGNORE_LABEL):
    """The denominator of `focal`: the number of valid pixels."""
    return jnp.sum(labels != ignore_label).astype(jnp.result_type(float))


LOSSES: dict[str, Callable] = {
    "cross_entropy": cross_entropy,
    "dice": dice,
    "focal": focal,
    "lovasz": lovasz,
    "ohem_cross_entropy": ohem_cross_entropy,
}


# Losses that are a ratio sum / count of pixel sums: (numerator, denominator). Data-parallel and
# accumulated steps add both up over devices and micro-batches, so they equal the loss of the
# whole global batch exactly; the others are computed per device on the gathered batch and per
# micro-batch.
PIXEL_SUMS: dict[str, tuple[Callable, Callable]] = {
    "cross_entropy": (cross_entropy_sum, cross_entropy_count),
    "focal": (focal_sum, focal_count),
}


def list_losses() -> list[str]:
    """The registered loss names, sorted."""
    return sorted(LOSSES)


# ----------------------------------------------------------------------------- expressions

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf(?:inity)?|nan)"
_TERM = re.compile(
    rf"\s*(?:(?P<weight>{_NUMBER})\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*", re.IGNORECASE
)


def parse_loss(expression: str) -> list[tuple[float, str]]:
    """Parses `'name'` or `'w1*name1 + w2*name2 + ...'` into [(weight, name), ...] in order.

    Weights are positive finite numbers (`0.5`, `.5`, `1e-2`), 1 when omitted; each name is a
    registered loss and appears once. Raises ValueError with one sentence otherwise.
    """
    valid = ", ".join(list_losses())
    if not expression or not expression.strip():
        raise ValueError(
            f"The loss expression (--config.loss) is empty; name at least one of: {valid}."
        )
    terms, seen, position = [], set(), 0
    while True:
        match = _TERM.match(expression, position)
        if match is None:
            raise ValueError(
                f"Malformed loss expression {expression!r} at character {position}: expected "
                "terms 'name' or 'weight*name' joined by '+', such as 'cross_entropy+0.5*dice'."
            )
        name, weight_text = match.group("name"), match.group("weight")
        weight = 1.0 if weight_text is None else float(weight_text)
        if name not in LOSSES:
            raise ValueError(
                f"Unknown loss {name!r} in --config.loss={expression!r}; valid losses: {valid}."
            )
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(
                f"The weight {weight_text} of loss {name!r} in {expression!r} must be a "
                "positive finite number."
            )
        if name in seen:
            raise ValueError(
                f"Loss {name!r} appears more than once in {expression!r}; give it one term "
                "with the summed weight."
            )
        seen.add(name)
        terms.append((weight, name))
        position = match.end()
        if position == len(expression):
            return terms
        if expression[position] != "+" or position + 1 == len(expression):
            raise ValueError(
                f"Malformed loss expression {expression!r} at character {position}: expected "
                "'+' followed by another 'name' or 'weight*name' term, as in "
                "'cross_entropy+0.5*dice'."
            )
        position += 1


def build_loss(
    expression: str,
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ohem_thresh: float = 0.7,
    ohem_min_kept: int = 100000,
    focal_gamma: float = 2.0,
) -> Callable:
    """Builds `fn(logits, labels) -> (total, terms)` from a loss expression (`--config.loss`).

    `terms` maps each loss name in the expression to its unweighted value and `total` is the
    weighted sum Σ weight·term. Each loss gets only the options it takes: `label_smoothing` goes
    to cross_entropy and ohem_cross_entropy, `ohem_thresh`/`ohem_min_kept` to
    ohem_cross_entropy, `focal_gamma` to focal; `ignore_label` and `class_weights` (length
    `num_classes`, non-negative; None or empty = unweighted) to all. The returned function is
    pure and can be jitted.
    """
    parsed = parse_loss(expression)
    if class_weights is not None and len(class_weights) == 0:
        class_weights = None  # the config's `()`
    if class_weights is not None:
        class_weights = [float(w) for w in class_weights]
        if len(class_weights) != num_classes:
            raise ValueError(
                f"--config.class_weights has {len(class_weights)} values but there are "
                f"{num_classes} classes; give one weight per class."
            )
        if not all(math.isfinite(w) and w >= 0 for w in class_weights):
            raise ValueError(
                f"--config.class_weights must be finite and non-negative, got {class_weights}."
            )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    options = {
        "ignore_label": ignore_label,
        "class_weights": None if class_weights is None else tuple(class_weights),
        "label_smoothing": label_smoothing,
        "thresh": ohem_thresh,
        "min_kept": ohem_min_kept,
        "gamma": focal_gamma,
    }
    bound = []
    for weight, name in parsed:
        fn = LOSSES[name]
        accepted = inspect.signature(fn).parameters
        kwargs = {key: value for key, value in options.items() if key in accepted}
        bound.append((weight, name, fn, kwargs))

    def loss_fn(logits, labels):
        if logits.shape[-1] != num_classes:
            raise ValueError(
                f"The logits have {logits.shape[-1]} classes but the loss was built for "
                f"num_classes={num_classes}."
            )
        terms = {name: fn(logits, labels, **kwargs) for _, name, fn, kwargs in bound}
        total = sum(weight * terms[name] for weight, name, _, _ in bound)
        return total, terms

    loss_fn.pixel_sums = None
    if all(name in PIXEL_SUMS for _, name, _, _ in bound):

        def _kwargs(fn, kwargs):
            return {k: v for k, v in kwargs.items() if k in inspect.signature(fn).parameters}

        def numerators(logits, labels):
            return {
                name: PIXEL_SUMS[name][0](logits, labels, **kwargs) for _, name, _, kwargs in bound
            }

        def denominators(labels):
            return {
                name: PIXEL_SUMS[name][1](labels, **_kwargs(PIXEL_SUMS[name][1], kwargs))
                for _, name, _, kwargs in bound
            }

        loss_fn.pixel_sums = PixelSumLoss(
            {name: weight for weight, name, _, _ in bound}, numerators, denominators
        )
    return loss_fn


class PixelSumLoss(NamedTuple):
    """A loss expression whose every term is sum / count over pixels (`PIXEL_SUMS`): the form a
    step uses to normalise by the count of a whole global batch that it sees in parts (devices
    under pmap, micro-batches under gradient accumulation).

    term = numerators(logits, labels)[name] / denominators(labels)[name], each summed over all
    parts first; total = Σ weights[name]·term (`combine`)."""

    weights: dict
    numerators: Callable
    denominators: Callable

    def combine(self, numerators: dict, denominators: dict):
        """(total, terms) from the summed numerators and denominators."""
        terms = {name: _safe_divide(numerators[name], denominators[name]) for name in numerators}
        return sum(self.weights[name] * terms[name] for name in terms), terms
