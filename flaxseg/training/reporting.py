"""Metric writing: stdout and TensorBoard event files via tensorboardX."""

from pathlib import Path
from typing import Mapping

import jax


class MetricWriter:
    """Writes scalars to `<workdir>/tensorboard` (process 0 only) and logs them."""

    def __init__(self, workdir):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # a maintained, TensorFlow-free event writer

            self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, float], log: bool = True) -> None:
        if log and jax.process_index() == 0:
            line = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
            print(f"step {step}: {line}", flush=True)
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
