"""Data parallelism: one mesh axis 'data' over every device of every host; state replicated.

The batch is split along its first axis over 'data', so a jitted step computes means over the
global batch: gradients and BatchNorm batch statistics are global by construction.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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
