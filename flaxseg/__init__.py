"""flaxseg: semantic segmentation in JAX/Flax.

Layers (imports only point down):
  train.py / eval.py / predict.py / export.py   thin absl entry points
  flaxseg.training              train state, steps, schedules, checkpoint saving, the loop
  flaxseg.serving               restore a run for inference, predict, export; the exported-model
                                loader (flaxseg.export.load) imports neither models nor training
  flaxseg.data                  TFDS builders and the grain input pipeline (one normalisation)
  flaxseg.models                registry, shared layers, backbones, one file per architecture
  flaxseg.losses, metrics, inference   pure functions: losses, confusion matrix, TTA, CRF
"""

__version__ = "0.1.0"
