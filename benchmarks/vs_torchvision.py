"""Alias kept for old commands: ``vs_pytorch.py`` restricted to one torchvision model.

  python benchmarks/vs_torchvision.py [--arch=deeplabv3_resnet50] [--size=257] [--batch_size=2]
      [--steps=3] [--threads=2]

runs ``python benchmarks/vs_pytorch.py --models=tv:<arch> --repeats=<steps> --skip_compile``
with the other flags passed through (see vs_pytorch.py for what is measured and how).
"""

import runpy
import sys
from pathlib import Path

_RENAMED = {"--arch": "--models", "--steps": "--repeats"}


def translate(argv: list[str]) -> list[str]:
    """vs_torchvision.py's flags as vs_pytorch.py flags."""
    args, arch = [], "deeplabv3_resnet50"
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == "--arch":
            arch = value
        elif name in _RENAMED:
            args.append(f"{_RENAMED[name]}={value}")
        else:
            args.append(arg)
    return [f"--models=tv:{arch}", "--skip_compile", *args]


if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "vs_pytorch.py"
    sys.argv = [str(target), *translate(sys.argv[1:])]
    runpy.run_path(str(target), run_name="__main__")
