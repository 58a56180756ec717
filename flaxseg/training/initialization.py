"""Where a fresh run's parameters come from besides random initialisation: an ImageNet backbone
file (``--pretrained``) or another run's checkpoint (``--init_from``, FCN's staged training).

Both apply only when a run starts (never on resume) and both say what they loaded and what
stayed as initialised.
"""

from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from flaxseg.serving import checkpoints
from flaxseg.training import reporting
from flaxseg.training import spec as spec_lib
from flaxseg.training.sharding import replicated

# What the source run must share with this one; the architecture may differ (FCN-32s -> 16s).
INIT_FROM_FACTS = ("num_classes", "backbone", "in_channels", "param_dtype")


def _with_variables(state, variables: dict, mesh):
    """``state`` with new params/batch_stats (placed on the mesh) and a fresh optimiser state."""
    params = jax.device_put(variables["params"], replicated(mesh))
    return state.replace(
        params=params,
        batch_stats=jax.device_put(variables.get("batch_stats") or {}, replicated(mesh)),
        opt_state=jax.jit(state.tx.init, out_shardings=replicated(mesh))(params),
    )


def _host_variables(state) -> dict:
    return {
        "params": jax.device_get(state.params),
        "batch_stats": jax.device_get(state.batch_stats),
    }


def load_pretrained(state, path, model, mesh):
    """Loads backbone weights from a PyTorch/safetensors file; says what stayed random."""
    from flaxseg import weights

    if not Path(path).is_file():
        raise FileNotFoundError(f"--pretrained={path} does not exist.")
    variables, report = weights.load_pretrained_backbone(_host_variables(state), path, model)
    reporting.say(str(report))
    return _with_variables(state, variables, mesh)


def _check_source(workdir, source_spec: dict, spec: dict) -> None:
    differences = spec_lib.spec_differences(source_spec, spec, INIT_FROM_FACTS)
    if differences:
        held = ", ".join(f"{key}={saved!r}" for key, (saved, _) in differences.items())
        wanted = ", ".join(f"{key}={requested!r}" for key, (_, requested) in differences.items())
        words = [spec_lib.FACT_NAMES[key] for key in differences]
        words = ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]
        raise ValueError(
            f"--init_from={workdir} holds a {source_spec['model']} with {held}, but this run's "
            f"{spec['model']} has {wanted}; initialise from a run with the same {words}."
        )


def check_init_from(workdir, spec: dict) -> None:
    """One sentence, from the recorded spec alone (before any set-up or array read), when the
    latest checkpoint of ``workdir`` cannot initialise this run: another class count,
    backbone, input channels or parameter dtype (the score layers, the stem or the whole
    backbone would not fit, and a silent partial load would hide the mistake)."""
    _, restored = checkpoints.restore_workdir(
        workdir,
        "latest",
        flag="--init_from",
        restore_fn=lambda manager, step: {"meta": checkpoints.read_meta(manager, step)},
    )
    _check_source(workdir, restored["meta"]["model_spec"], spec)


def init_from(state, workdir, spec: dict, mesh):
    """Copies every parameter and BatchNorm statistic of the latest checkpoint in ``workdir``
    whose path and shape match this model's; the rest keep their initialisation.

    Another class count, backbone, input channels or parameter dtype is refused
    (``check_init_from``), before the checkpoint's arrays are read.
    """

    def checked_restore(manager, step):
        source_spec = checkpoints.read_meta(manager, step)["model_spec"]
        try:
            _check_source(workdir, source_spec, spec)
        except ValueError as error:
            raise checkpoints.NotTheCheckpoint() from error
        return checkpoints.restore(manager, step)

    step, restored = checkpoints.restore_workdir(
        workdir, "latest", flag="--init_from", restore_fn=checked_restore
    )
    source_spec = restored["meta"]["model_spec"]
    source = traverse_util.flatten_dict(
        {
            "params": restored["state"]["params"],
            "batch_stats": restored["state"].get("batch_stats") or {},
        }
    )
    target = traverse_util.flatten_dict(_host_variables(state))
    loaded, kept = [], []
    for path, value in target.items():
        match = source.get(path)
        if match is not None and tuple(np.shape(match)) == tuple(value.shape):
            target[path] = np.asarray(match, dtype=value.dtype)
            loaded.append(path)
        elif path[0] == "params":
            kept.append("/".join(path[1:]))
    unused = sorted("/".join(p[1:]) for p in source if p[0] == "params" and p not in set(loaded))
    if not any(p[0] == "params" for p in loaded):
        raise ValueError(
            f"--init_from={workdir} ({source_spec['model']}) shares no parameter path and shape "
            f"with this {spec['model']}."
        )
    reporting.say(
        f"Initialised {sum(p[0] == 'params' for p in loaded)} parameter arrays from "
        f"{workdir} (step {step}, {source_spec['model']}); kept as initialised: "
        f"{', '.join(kept) or 'none'}; not used from the checkpoint: {', '.join(unused) or 'none'}."
    )
    return _with_variables(state, traverse_util.unflatten_dict(target), mesh)
