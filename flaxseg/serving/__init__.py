"""Serving: inference-time code, below training (training imports it, never the reverse).

    restore.py      a trained run directory (workdir) rebuilt for inference: the model from
                    its recorded spec, the variables, class names and colours; eval.py,
                    predict.py and export.py all restore through it
    checkpoints.py  reading the run's Orbax checkpoints (training writes them)
    options.py      test-time augmentation options and the --scales flag
    predict.py      predict.py: image files -> palette PNGs, overlays, probabilities
    export.py       export.py: the inference function serialised with jax.export
    loader.py       `flaxseg.export.load`: an exported model, with jax and numpy only

Importing this package imports none of its modules, so the loader stays free of the model code.
"""
