"""Confusion matrix, IoU and the loss against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import metrics
from flaxseg.losses import cross_entropy


def test_confusion_matrix_by_hand():
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    preds = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    # gt 0: pred 0,1       -> cm[0,0]=1, cm[0,1]=1
    # gt 1: pred 1,1,0     -> cm[1,1]=2, cm[1,0]=1
    # gt 2: pred 2,0       -> cm[2,2]=1, cm[2,0]=1     (the 255 pixel is ignored)
    expected = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    cm = jax.jit(metrics.confusion_matrix, static_argnums=2)(labels, preds, 3)
    np.testing.assert_array_equal(np.asarray(cm), expected)
    # IoU_c = tp / (row + col - tp): 1/(2+3-1), 2/(3+3-2), 1/(2+1-1)
    np.testing.assert_allclose(metrics.per_class_iou(cm), [1 / 4, 2 / 4, 1 / 2])
    assert metrics.mean_iou(cm) == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert metrics.pixel_accuracy(cm) == pytest.approx(4 / 7)
    assert metrics.mean_class_accuracy(cm) == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_confusion_matrices_add_up_across_batches():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (4, 8, 8))
    labels[:, 0] = 255
    preds = rng.integers(0, 5, (4, 8, 8))
    whole = metrics.confusion_matrix(labels, preds, 5)
    parts = sum(metrics.confusion_matrix(labels[i], preds[i], 5) for i in range(4))
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(parts))
    assert int(whole.sum()) == 4 * 7 * 8


def test_absent_class_is_excluded_from_mean_iou():
    cm = np.array([[3, 0, 0], [0, 0, 0], [1, 0, 2]])
    iou = metrics.per_class_iou(cm)
    assert np.isnan(iou[1])
    assert metrics.mean_iou(cm) == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_loss_ignores_255():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
    labels = rng.integers(0, 3, (2, 4, 4))
    ignored = labels.copy()
    ignored[:, :2] = 255
    loss = cross_entropy(logits, ignored)
    log_probs = jax.nn.log_softmax(logits)
    keep = ignored != 255
    manual = -np.mean(
        np.take_along_axis(np.asarray(log_probs), labels[..., None], -1)[..., 0][keep]
    )
    assert float(loss) == pytest.approx(manual, rel=1e-6)
    # Changing the logits of ignored pixels changes nothing.
    perturbed = logits.at[:, :2].add(100.0)
    assert float(cross_entropy(perturbed, ignored)) == pytest.approx(float(loss), rel=1e-6)
    # A batch with no valid pixel gives zero, not NaN.
    assert float(cross_entropy(logits, np.full_like(labels, 255))) == 0.0
