"""Optimiser and learning-rate schedule: SGD with momentum, poly decay, decoupled-from-BN weight decay."""

import optax
from flax import traverse_util


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9, warmup_steps: int = 0):
    """lr(t) = base_lr · (1 − t / total_steps)^power (DeepLab's 'poly'), with optional linear warmup."""
    decay = optax.polynomial_schedule(
        init_value=base_lr,
        end_value=0.0,
        power=power,
        transition_steps=max(total_steps - warmup_steps, 1),
    )
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def weight_decay_mask(params):
    """True for convolution / dense kernels; False for biases and BatchNorm scales and offsets.

    Decaying BN parameters and biases is a known source of lost accuracy; the DeepLab and
    MMSegmentation recipes exclude them. Kernels are the parameters named 'kernel'.
    """
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] == "kernel" for path in flat})


def create_optimizer(
    *, learning_rate, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False
) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the gradient (as torch.optim.SGD does)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
