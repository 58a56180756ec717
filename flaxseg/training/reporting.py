"""What a run tells its user: lines on stdout, a progress bar, TensorBoard event files.

Only process 0 speaks and writes, so a many-host run logs once.
"""

from pathlib import Path
from typing import Mapping

import jax


def say(message: str) -> None:
    """Print one line (process 0 only), flushed so that it interleaves with the progress bar."""
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message)  # on its own line, also while a progress bar is drawn


def progress_bar(total: int, initial: int, enabled: bool = True):
    """A tqdm bar over the training steps, or None (disabled, or not process 0)."""
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


class MetricWriter:
    """Writes scalars to `<workdir>/tensorboard` (process 0 only) and logs them."""

    def __init__(self, workdir):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # a maintained, TensorFlow-free event writer

            self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, float], log: bool = True) -> None:
        if log:
            say(
                f"step {step}: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
            )
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
