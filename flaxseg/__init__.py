"""flaxseg: semantic segmentation in JAX/Flax.

Layers (imports only point down):
  train.py / eval.py            thin absl entry points
  flaxseg.training              train state, steps, losses, schedules, checkpoints, the loop
  flaxseg.data                  TFDS builders and the grain input pipeline
  flaxseg.models                registry, shared layers, backbones, one file per architecture
  flaxseg.metrics               confusion matrix and mIoU
"""

__version__ = "0.1.0"
