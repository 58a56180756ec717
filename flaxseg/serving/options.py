"""How a model predicts at test time (eval.py, predict.py): `InferenceOptions` (scales, flip,
sliding windows, the dense CRF; `flaxseg.inference` does the work) and the ``--scales`` flag
parsed."""

import dataclasses
from typing import Optional

from flaxseg import inference


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How eval predicts: softmax averaged over ``scales`` × (identity, flip if ``flip``), each
    whole or in ``window``-pixel sliding windows overlapping by ``overlap``, then the dense CRF
    if ``crf``. The defaults are plain inference."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: Optional[int] = None
    overlap: float = 0.33
    crf: bool = False

    def __post_init__(self):
        object.__setattr__(
            self, "scales", inference.check_options(self.scales, self.window, self.overlap)
        )

    @property
    def plain(self) -> bool:
        return self == InferenceOptions()

    @property
    def needs_sizes(self) -> bool:
        """Scaling and flipping act on each image's real (unpadded) size."""
        return self.flip or self.scales != (1.0,)


def parse_scales(values) -> tuple[float, ...]:
    """``--scales=0.5,0.75,1.0`` (absl's list of strings) -> (0.5, 0.75, 1.0), checked."""
    scales = []
    for value in values:
        try:
            scales.append(float(value))
        except ValueError:
            raise ValueError(
                f"--scales takes numbers such as 0.5,1.0,1.5, got {value!r}."
            ) from None
    return inference.check_options(scales)
