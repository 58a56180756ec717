"""Serving: inference-time code, below training.

    predict.py      predict.py: image files -> palette PNGs, overlays, probabilities
    export.py       export.py: the inference function serialised with jax.export
    loader.py       `flaxseg.export.load`: an exported model, with jax and numpy only

Importing this package imports none of its modules, so the loader stays free of the model code.
"""
