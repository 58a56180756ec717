"""Loading a model written by export.py: only jax and numpy, never the model code.

    from flaxseg import export
    model = export.load("deeplabv3plus.jax")
    logits = model(images)          # uint8 [B, H, W, 3] RGB -> float32 [B, H, W, C]
    model.class_names, model.colormap, model.input_shape   # from the JSON beside the file

The file is ``jax.export.Exported.serialize()`` of the inference function (normalisation
included), so ``jax.export.deserialize(open(path, 'rb').read()).call(images)`` works too, with
jax alone.
"""

import json
from pathlib import Path
from typing import Optional

import jax
import numpy as np


class ExportedModel:
    """A deserialised inference function with the metadata export.py wrote beside it."""

    def __init__(self, exported: jax.export.Exported, metadata: Optional[dict], path: str):
        self.exported = exported
        self.metadata = metadata or {}
        self.path = path
        self._call = jax.jit(exported.call)

    @property
    def input_shape(self) -> tuple:
        """(B, H, W, 3); None for each symbolic dimension."""
        return tuple(d if isinstance(d, int) else None for d in self.exported.in_avals[0].shape)

    @property
    def num_classes(self) -> int:
        return int(self.exported.out_avals[0].shape[-1])

    @property
    def class_names(self) -> Optional[list]:
        return self.metadata.get("class_names")

    @property
    def colormap(self) -> Optional[np.ndarray]:
        colours = self.metadata.get("colormap")
        return None if colours is None else np.asarray(colours, np.uint8)

    def __call__(self, images) -> jax.Array:
        """uint8 [B, H, W, 3] RGB images -> float32 logits [B, H, W, num_classes]."""
        images = np.asarray(images) if not isinstance(images, jax.Array) else images
        expected = self.input_shape
        shape_ok = images.ndim == 4 and all(
            e is None or e == s for e, s in zip(expected, images.shape)
        )
        if images.dtype != np.uint8 or not shape_ok:
            wanted = ", ".join("?" if d is None else str(d) for d in expected)
            raise ValueError(
                f"{self.path} takes uint8 images of shape [{wanted}], got "
                f"{images.dtype} {list(images.shape)}."
            )
        return self._call(images)


def load(path) -> ExportedModel:
    """The model exported to ``path`` by export.py (with ``path``.json's metadata if present)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Exported model {path} does not exist.")
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception as error:  # a truncated or foreign file: flatbuffers raises many types
        raise ValueError(
            f"{path} is not a model written by export.py (jax.export could not read it: "
            f"{type(error).__name__})."
        ) from None
    sidecar = Path(f"{path}.json")
    metadata = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    return ExportedModel(exported, metadata, str(path))
