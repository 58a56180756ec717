"""Segmentation metrics as pure array functions.

The confusion matrix is the one quantity accumulated during evaluation: it is summed over batches
and devices (sums commute), and IoU / accuracy are computed once from the total at the end. Rows
index the
ground-truth class, columns the predicted class. Pixels labelled `ignore_label` (255, VOC's void
boundary) are never counted.
"""

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.constants import IGNORE_LABEL


def confusion_matrix(labels, predictions, num_classes: int, ignore_label: int = IGNORE_LABEL):
    """Returns the [num_classes, num_classes] int32 confusion matrix of one batch.

    Args:
        labels: int array [...], class indices in [0, num_classes) or `ignore_label`.
        predictions: int array of the same shape, class indices in [0, num_classes).
    """
    labels = labels.reshape(-1).astype(jnp.int32)
    predictions = predictions.reshape(-1).astype(jnp.int32)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    # Invalid pixels are routed to a spare bin that is dropped, so shapes stay static under jit.
    index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = jax.ops.segment_sum(jnp.ones_like(index), index, num_segments=num_classes**2 + 1)
    return counts[:-1].reshape(num_classes, num_classes)


def per_class_iou(confusion) -> np.ndarray:
    """IoU of each class, tp / (tp + fp + fn); NaN for a class absent from labels and
    predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)


def mean_iou(confusion) -> float:
    """Mean IoU over the classes present in labels or predictions (the VOC protocol)."""
    iou = per_class_iou(confusion)
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def pixel_accuracy(confusion) -> float:
    """Fraction of non-ignored pixels classified correctly."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total > 0 else float("nan")


def mean_class_accuracy(confusion) -> float:
    """Mean over classes present in the labels of per-class recall."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=1)
    present = support > 0
    return (
        float(np.mean(np.diag(confusion)[present] / support[present]))
        if present.any()
        else float("nan")
    )
