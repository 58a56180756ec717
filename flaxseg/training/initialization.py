"""Where a fresh run's parameters come from besides random initialisation: an ImageNet backbone
file (``--pretrained``) or another run's checkpoint (``--init_from``, FCN's staged training).

Both apply only when a run starts (never on resume) and both say what they loaded and what
stayed as initialised.
"""

from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from flaxseg.training import checkpointing, reporting
from flaxseg.training.sharding import replicated


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


def init_from(state, workdir, spec: dict, mesh):
    """Copies every parameter and BatchNorm statistic of the latest checkpoint in ``workdir``
    whose path and shape match this model's; the rest keep their initialisation.

    Another class count is refused: the score layers would not match and a silent partial load
    would hide the mistake.
    """
    step, restored = checkpointing.restore_workdir(workdir, "latest", flag="--init_from")
    source_spec = restored["meta"]["model_spec"]
    if source_spec["num_classes"] != spec["num_classes"]:
        raise ValueError(
            f"--init_from={workdir} holds a {source_spec['model']} with "
            f"num_classes={source_spec['num_classes']}, but this run's {spec['model']} has "
            f"num_classes={spec['num_classes']}; initialise from a run on the same classes."
        )
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
