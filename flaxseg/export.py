"""`flaxseg.export.load(path)`: the exported-model loader, `flaxseg.serving.loader`."""

from flaxseg.serving.loader import ExportedModel, load  # noqa: F401
