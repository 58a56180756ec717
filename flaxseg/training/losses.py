"""Losses as pure array functions."""

import jax.numpy as jnp
import optax

from flaxseg.constants import IGNORE_LABEL


def cross_entropy_with_ignore(logits, labels, ignore_label: int = IGNORE_LABEL):
    """Mean per-pixel softmax cross-entropy over the pixels whose label is not `ignore_label`.

    Args:
        logits: float [B, H, W, C] (computed in float32 for stability whatever the model dtype).
        labels: int [B, H, W].
    Returns:
        (loss, num_valid): scalar mean loss (0 when no pixel is valid) and the valid-pixel count.
    """
    valid = labels != ignore_label
    safe_labels = jnp.where(valid, labels, 0)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), safe_labels
    )
    num_valid = valid.sum()
    loss = jnp.sum(per_pixel * valid) / jnp.maximum(num_valid, 1)
    return loss, num_valid
