"""Reading the Orbax checkpoints in `<workdir>/checkpoints` (training's checkpointing module
writes them).

Each checkpoint holds three items:
    * 'state': step, params, batch_stats and optimiser state;
    * 'data':  the input iterator's position (a JSON dict), so an interrupted run resumes exactly;
    * 'meta':  the model spec (name, num_classes, backbone, in_channels, param_dtype, keyword
               arguments) and the run's config, so eval.py can rebuild the model from the
               workdir alone and a run with another model cannot silently overwrite it
               (training's ``check_compatible``, from the spec alone, before any array
               is read).
Retention: the last `keep` checkpoints plus the best one by validation mIoU (saved with metrics).
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a killed
run never leaves a half-written checkpoint behind as the latest.

Restoring for inference (`flaxseg.serving.restore`) and resuming a run both read through this
module, which sits below training and imports no other flaxseg module.
"""

from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers

_ITEMS = ("state", "data", "meta")


def checkpoint_dir(workdir) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def _miou(metrics) -> float:
    return metrics["miou"]


def create_manager(workdir, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(
                get_metric_fn=_miou,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy,
        # best_fn makes Orbax write each checkpoint's metrics to disk, so the best checkpoint is
        # still known (and kept) after a restart; retention itself is the policy above.
        best_fn=_miou,
        best_mode="max",
        create=not read_only,
        save_interval_steps=0 if read_only else 1,
        read_only=read_only,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=_ITEMS)


def _stored_abstract_state(manager, step: int) -> Any:
    """The stored state's shapes and dtypes, replicated over this run's devices: a checkpoint
    saved on other devices (more hosts, another device count) restores here all the same."""
    metadata = ocp.StandardCheckpointHandler().metadata(
        Path(manager.directory) / str(step) / "state"
    )
    # Replicated over every device of every host, on the mesh training uses (one 'data' axis).
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec())
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        getattr(metadata, "tree", metadata),
    )


def restore(manager, step: int, abstract_state: Optional[Any] = None) -> dict:
    """Restores {'state', 'data', 'meta'}; without `abstract_state` the arrays come back with
    their stored shapes and dtypes, replicated over this run's devices."""
    if abstract_state is None:
        abstract_state = _stored_abstract_state(manager, step)
    state_args = ocp.args.StandardRestore(abstract_state)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=state_args, data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        ),
    )
    return {name: restored[name] for name in _ITEMS}


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


class NotTheCheckpoint(Exception):
    """Raised (from the real error) by a `restore_fn` for a failure that is not the checkpoint's
    fault, e.g. a bad flag; `restore_intact` re-raises the real error instead of trying an older
    checkpoint."""


def _path_name(path) -> str:
    """'params/fc6/kernel' for a key path of dicts, lists and named tuples (optax states)."""
    return "/".join(
        str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))) for k in path
    )


def _stored_arrays(manager, step: int) -> Optional[dict]:
    """{path: (shape, dtype)} of the arrays stored in checkpoint `step`, from its metadata
    (no array is read); None when the metadata does not read (a damaged checkpoint, which the
    restore then reports)."""
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(
            Path(manager.directory) / str(step) / "state"
        )
        tree = getattr(metadata, "tree", metadata)
    except Exception:  # Orbax and TensorStore raise many types for damaged files
        return None
    return {
        _path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(leaf, "shape")
    }


def _params_first(path: str) -> tuple:
    return (not path.startswith("params/"), not path.startswith("batch_stats/"), path)


def check_arrays(manager, step: int, abstract: Any, *, partial: bool = False) -> None:
    """One sentence (``ValueError``) when the arrays stored in checkpoint `step` are not those
    of `abstract` (what they are about to be restored into: same paths, shapes and dtypes),
    read from the checkpoint's metadata before any array is. With `partial` only the paths of
    `abstract` must be there. Orbax would otherwise fail on the first shape (a failure the
    resume would take for damage) or silently cast another dtype."""
    stored = _stored_arrays(manager, step)
    if stored is None:
        return
    wanted = {
        _path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }

    def describe(entry):
        return f"{entry[0]} {entry[1].name}" if entry else "absent"

    problems = [
        f"{path} is {describe(stored.get(path))} there, {describe(wanted.get(path))} here"
        for path in sorted(set(wanted) | (set() if partial else set(stored)), key=_params_first)
        if stored.get(path) != wanted.get(path)
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            f"Checkpoint step {step} in {manager.directory} holds arrays that do not fit the "
            f"model restored from it: {'; '.join(problems[:3])}{more}; it was left untouched "
            "(the model settings or flaxseg's code differ from the run that saved it)."
        )


def _checked(check) -> None:
    """Runs `check`; its ValueError is the caller's (a mismatch), not a damaged checkpoint."""
    try:
        check()
    except ValueError as error:
        raise NotTheCheckpoint() from error


def restore_variables(manager, step: int, abstract_variables: dict, sharding) -> dict:
    """{'state': {'params', 'batch_stats'}, 'meta'} of checkpoint `step`, reading only those
    arrays (not the optimiser state) and placing them with `sharding`: what evaluation needs.
    Arrays that do not fit `abstract_variables` are refused first (``check_arrays``)."""
    item = {k: v for k, v in abstract_variables.items() if jax.tree.leaves(v)}
    _checked(lambda: check_arrays(manager, step, item, partial=True))
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), item)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return {"state": restored["state"], "meta": restored["meta"]}


def restore_intact(
    manager, steps, abstract_state: Optional[Any] = None, on_damaged=print, restore_fn=None
) -> tuple[int, dict]:
    """Restores the newest of `steps` that restores; each one that does not (a truncated or
    missing file, an unfinished save) is reported through `on_damaged(step, sentence)` and left
    where it is. Raises ValueError when none restores. `restore_fn(manager, step)` replaces
    the full restore (evaluation reads only the variables)."""
    where = Path(manager.directory)
    if restore_fn is None:

        def restore_fn(manager, step):
            if abstract_state is not None:
                _checked(lambda: check_arrays(manager, step, abstract_state))
            return restore(manager, step, abstract_state)

    for step in sorted(steps, reverse=True):
        try:
            return step, restore_fn(manager, step)
        except NotTheCheckpoint as error:
            raise error.__cause__ from None
        except Exception as error:  # Orbax and TensorStore raise many types for damaged files
            on_damaged(
                step,
                f"Checkpoint step {step} in {where} could not be restored ({_reason(error)}); "
                "it was left in place.",
            )
    raise ValueError(f"No checkpoint in {where} could be restored (tried steps {sorted(steps)}).")


def restore_workdir(
    workdir, which: str = "latest", flag: str = "--workdir", restore_fn=None
) -> tuple[int, dict]:
    """(step, {'state', 'data', 'meta'}) of checkpoint `which` ('latest', 'best' or a step) of a
    trained workdir, read-only; one clear error when the workdir holds none. For 'latest' a
    damaged newest checkpoint is reported and the newest intact one is used."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{flag}={workdir} holds no checkpoints ({directory} does not exist); "
            "train first with train.py --workdir."
        )
    manager = create_manager(workdir, read_only=True)
    step = resolve_step(manager, which)
    if which == "latest":
        return restore_intact(
            manager, manager.all_steps(), on_damaged=lambda s, m: print(m), restore_fn=restore_fn
        )
    try:
        return step, (restore_fn or restore)(manager, step)
    except NotTheCheckpoint as error:
        raise error.__cause__ from None
    except Exception as error:  # a damaged checkpoint asked for by name
        raise ValueError(
            f"Checkpoint step {step} in {directory} could not be restored ({_reason(error)}); "
            "it was left in place."
        ) from None


def read_meta(manager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def best_step(manager) -> Optional[int]:
    """The step with the highest recorded validation mIoU, or None if no checkpoint has metrics."""
    scored = [
        (manager.metrics(step)["miou"], step)
        for step in manager.all_steps()
        if manager.metrics(step) and "miou" in manager.metrics(step)
    ]
    return max(scored)[1] if scored else None


def resolve_step(manager, which: str) -> int:
    """Maps 'latest', 'best' or a step number to an existing step; one clear error otherwise."""
    steps = manager.all_steps()
    where = checkpoint_dir(Path(manager.directory).parent)
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint found in {where}; train first with train.py --workdir."
        )
    if which == "latest":
        return manager.latest_step()
    if which == "best":
        step = best_step(manager)
        if step is None:
            raise ValueError(
                f"No checkpoint in {where} was saved with a validation mIoU; "
                "use --checkpoint=latest."
            )
        return step
    if not str(which).isdigit() or int(which) not in steps:
        raise ValueError(
            f"--checkpoint={which!r} is not 'latest', 'best' or one of the saved steps "
            f"{sorted(steps)} in {where}."
        )
    return int(which)
