"""Writing the Orbax checkpoints in `<workdir>/checkpoints`: saving, setting a damaged one aside,
and refusing to overwrite another model's. Their layout and everything that reads them (resume,
eval, predict, export) is `flaxseg.serving.checkpoints`.
"""

from pathlib import Path
from typing import Optional

import orbax.checkpoint as ocp

from flaxseg.serving.checkpoints import checkpoint_dir
from flaxseg.training import spec as spec_lib


def save(
    manager, step: int, *, state: dict, data_state: dict, meta: dict, metrics: Optional[dict] = None
) -> None:
    from flaxseg.training import preemption  # the fault-injection hook of the resume tests

    preemption.test_kill_point("mid_save", step)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
    )


def set_aside(workdir, step: int) -> Path:
    """Moves the damaged checkpoint `step` out of the way of new saves (Orbax cannot write a step
    that exists) to `<workdir>/checkpoints_damaged/<step>`; nothing is deleted."""
    target = Path(workdir).absolute() / "checkpoints_damaged" / str(step)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{step}.{len(list(target.parent.iterdir()))}")
    (checkpoint_dir(workdir) / str(step)).rename(target)
    return target


def check_compatible(saved_spec: dict, requested_spec: dict, workdir) -> None:
    """Refuses to resume (and so to overwrite) a workdir whose checkpoint holds another model:
    another architecture, backbone, class count, input channels, parameter dtype, constructor
    arguments or adversary (``spec.architecture``), read from the recorded spec before any
    array is."""
    differences = spec_lib.spec_differences(saved_spec, requested_spec)
    if differences:
        listed = ", ".join(
            f"{key}={saved!r} (requested {requested!r})"
            for key, (saved, requested) in differences.items()
        )
        raise ValueError(
            f"Workdir {workdir} holds a checkpoint of a different model: {listed}; "
            "it was left untouched: pass a new --workdir or the same model settings."
        )
