"""Inference beside the metrics, at the bottom of the house: test-time augmentation
(multi-scale, flip, sliding windows) as pure array functions of an ``apply_fn``, and the fully
connected CRF (``dense_crf``). Imports no other flaxseg layer.

    from flaxseg import inference
    probs = inference.predict_probs(apply_fn, images, scales=(0.5, 1.0, 1.5), flip=True)
    refined = inference.dense_crf(image_uint8, probs[0])   # [H, W, C] -> [H, W, C]
"""

from flaxseg.inference.crf import dense_crf
from flaxseg.inference.tta import (
    check_options,
    flip_padded,
    predict_probs,
    resize_padded,
    sliding_window_probs,
    window_starts,
)

__all__ = [
    "check_options",
    "dense_crf",
    "flip_padded",
    "predict_probs",
    "resize_padded",
    "sliding_window_probs",
    "window_starts",
]
