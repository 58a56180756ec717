"""Data parallelism: one mesh axis 'data' over every device of every host; state replicated.

The batch is split along its first axis over 'data', so a jitted step computes means over the
global batch: gradients and BatchNorm batch statistics are global by construction.

`--parallel=pmap` runs the same step under `jax.pmap` over each host's local devices instead,
with a copy of the state per device (`to_replicas`); the step then sums its parts over the axis
`PMAP_AXIS` (flaxseg.training.steps), so both give the same update. Checkpoints and evaluation
always see the mesh form (`from_replicas`).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PARALLEL = ("jit", "pmap")
PMAP_AXIS = "batch"


def create_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of everything that is not the batch: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Assembles the global batch from this host's part, split along the batch axis over 'data'."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }


def to_replicas(tree):
    """One copy of `tree` per local device, stacked along a new leading axis (pmap's layout)."""
    from flax import jax_utils

    return jax_utils.replicate(jax.device_get(tree), devices=jax.local_devices())


def from_replicas(tree, mesh: Mesh):
    """The first local replica of a pmapped `tree`, as arrays replicated over the mesh (what
    checkpoints and the jitted evaluation take; every replica holds the same values)."""
    sharding = replicated(mesh)
    host = jax.device_get(jax.tree.map(lambda x: x[0], tree))
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index]),
        host,
    )


def split_for_replicas(batch: dict) -> dict:
    """This host's batch [B, ...] as [local devices, B / local devices, ...] for pmap."""
    count = jax.local_device_count()
    return {
        key: np.asarray(value).reshape(count, -1, *np.shape(value)[1:])
        for key, value in batch.items()
    }
