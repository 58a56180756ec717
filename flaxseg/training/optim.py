"""Optimiser and learning-rate schedules: SGD with momentum, per-parameter groups, weight decay.

The paper recipes train different parameters differently (Caffe's ``lr_mult``/``decay_mult``):
DeepLab v1/v2 give the classifier ten times the base rate and biases twice it, PSPNet gives its
pyramid pooling module and heads ten times, FCN keeps its bilinear ``upscore*`` deconvolutions
fixed. A recipe says so with ``param_groups``: an ordered tuple of rules, each a dict with

    pattern       a regular expression searched in the parameter's path, e.g. 'fc8/kernel'
                  ('/'-joined module names and the leaf name: 'backbone/layer1_0/bn1/scale')
    lr_mult       learning-rate multiplier (default 1.0); 0 freezes the parameter
    weight_decay  this group's L2 weight decay (default: the config's ``weight_decay`` on
                  kernels, 0 on biases and BatchNorm parameters)

The first rule whose pattern matches a parameter decides its group; parameters that no rule
matches are in the default group (lr_mult 1, the default decay). A frozen parameter gets no
update at all (no decay, no momentum state): it stays bit-identical.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax
from flax import traverse_util

SCHEDULES = ("poly", "step", "constant")
_RULE_KEYS = {"pattern", "lr_mult", "weight_decay"}


def learning_rate_schedule(
    base_lr: float,
    total_steps: int,
    *,
    kind: str = "poly",
    power: float = 0.9,
    step_size: int = 0,
    gamma: float = 0.1,
    warmup_steps: int = 0,
) -> optax.Schedule:
    """The base learning rate over the steps, with optional linear warm-up.

    ``poly``: base_lr · (1 − t / total_steps)^power (DeepLab v2/v3, PSPNet). ``step``: base_lr ·
    gamma^⌊t / step_size⌋ (Caffe's 'step' policy, DeepLab v1). ``constant``: base_lr (Caffe's
    'fixed', FCN).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"--config.lr_schedule={kind!r} is not one of {', '.join(SCHEDULES)}.")
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "poly":
        decay = optax.polynomial_schedule(
            init_value=base_lr, end_value=0.0, power=power, transition_steps=decay_steps
        )
    elif kind == "step":
        if step_size <= 0:
            raise ValueError(
                f"--config.lr_step_size must be positive for the 'step' schedule, got {step_size}."
            )
        decay = optax.exponential_decay(base_lr, step_size, gamma, staircase=True)
    else:
        decay = optax.constant_schedule(base_lr)
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9, warmup_steps: int = 0):
    """lr(t) = base_lr · (1 − t / total_steps)^power (DeepLab's 'poly'), with optional warm-up."""
    return learning_rate_schedule(
        base_lr, total_steps, kind="poly", power=power, warmup_steps=warmup_steps
    )


def weight_decay_mask(params):
    """True for convolution / dense kernels; False for biases and BatchNorm scales and offsets.

    Decaying BN parameters and biases is a known source of lost accuracy; the DeepLab and
    MMSegmentation recipes exclude them. Kernels are the parameters named 'kernel'.
    """
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] == "kernel" for path in flat})


def validate_param_groups(rules: Sequence[Mapping[str, Any]]) -> None:
    """One sentence for a malformed ``--config.param_groups`` rule."""
    for index, rule in enumerate(rules):
        where = f"--config.param_groups[{index}]"
        if not isinstance(rule, Mapping) or "pattern" not in rule:
            raise ValueError(f"{where} must be a dict with a 'pattern', got {rule!r}.")
        unknown = sorted(set(rule) - _RULE_KEYS)
        if unknown:
            raise ValueError(
                f"{where} has unknown keys {unknown}; valid keys: {', '.join(sorted(_RULE_KEYS))}."
            )
        try:
            re.compile(rule["pattern"])
        except re.error as error:
            raise ValueError(
                f"{where} pattern {rule['pattern']!r} is not a regular expression ({error})."
            ) from None
        lr_mult = rule.get("lr_mult", 1.0)
        if not lr_mult >= 0:
            raise ValueError(f"{where} lr_mult must be non-negative, got {lr_mult!r}.")
        if rule.get("weight_decay", 0.0) < 0:
            raise ValueError(
                f"{where} weight_decay must be non-negative, got {rule['weight_decay']!r}."
            )


def _settings(rule: Mapping[str, Any] | None, is_kernel: bool, weight_decay: float):
    """(lr_mult, weight_decay) of a parameter decided by ``rule`` (None: the default group)."""
    rule = rule or {}
    lr_mult = float(rule.get("lr_mult", 1.0))
    decay = float(rule.get("weight_decay", weight_decay if is_kernel else 0.0))
    return lr_mult, (0.0 if lr_mult == 0 else decay)


def _deciding_rule(name: str, patterns: Sequence[re.Pattern]) -> int | None:
    return next((i for i, pattern in enumerate(patterns) if pattern.search(name)), None)


def _label(rule: int | None, is_kernel: bool) -> str:
    return f"{'default' if rule is None else f'rule{rule}'}_{'kernel' if is_kernel else 'other'}"


def param_groups(
    params, rules: Sequence[Mapping[str, Any]], weight_decay: float
) -> dict[str, dict[str, Any]]:
    """``{'/'-joined path: {'lr_mult', 'weight_decay', 'rule'}}`` for every parameter.

    ``rule`` is the index of the deciding rule (None for the default group). Frozen parameters
    (lr_mult 0) report weight_decay 0: they are not updated at all.
    """
    validate_param_groups(rules)
    patterns = [re.compile(rule["pattern"]) for rule in rules]
    groups = {}
    for path in traverse_util.flatten_dict(params):
        name = "/".join(path)
        rule = _deciding_rule(name, patterns)
        lr_mult, decay = _settings(
            None if rule is None else rules[rule], path[-1] == "kernel", weight_decay
        )
        groups[name] = {"lr_mult": lr_mult, "weight_decay": decay, "rule": rule}
    return groups


def create_optimizer(
    *,
    learning_rate: float | Callable,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
    param_groups: Sequence[Mapping[str, Any]] = (),
) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the gradient (as torch.optim.SGD and Caffe
    do), per parameter group (see the module docstring).

    Every (rule, kernel or not) pair is one ``optax.multi_transform`` branch with the schedule
    scaled by its ``lr_mult``; frozen groups get ``optax.set_to_zero()`` and keep no momentum.
    With no rules this is one SGD over every parameter with decay on kernels only.
    """
    rules = tuple(param_groups)
    validate_param_groups(rules)
    patterns = [re.compile(rule["pattern"]) for rule in rules]
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

    transforms = {}
    for index in (None, *range(len(rules))):
        for is_kernel in (True, False):
            lr_mult, decay = _settings(
                None if index is None else rules[index], is_kernel, weight_decay
            )
            if lr_mult == 0:
                transforms[_label(index, is_kernel)] = optax.set_to_zero()
                continue
            scaled = lambda step, m=lr_mult: m * schedule(step)  # noqa: E731
            transforms[_label(index, is_kernel)] = optax.chain(
                optax.add_decayed_weights(decay) if decay else optax.identity(),
                optax.sgd(scaled, momentum=momentum, nesterov=nesterov),
            )

    def labels(params):
        flat = {
            path: _label(_deciding_rule("/".join(path), patterns), path[-1] == "kernel")
            for path in traverse_util.flatten_dict(params)
        }
        return traverse_util.unflatten_dict(flat)

    return optax.multi_transform(transforms, labels)


def describe_groups(groups: Mapping[str, Mapping[str, Any]]) -> str:
    """A few lines summarising parameter groups for the run's log: one line per group with its
    multiplier, decay and how many arrays it holds, with an example path."""
    summary: dict[tuple, list[str]] = {}
    for name, group in groups.items():
        summary.setdefault((group["lr_mult"], group["weight_decay"]), []).append(name)
    lines = []
    for (lr_mult, decay), names in sorted(summary.items(), key=lambda item: -len(item[1])):
        state = "frozen" if lr_mult == 0 else f"lr ×{lr_mult:g}, weight decay {decay:g}"
        lines.append(f"  {state}: {len(names)} arrays, e.g. {names[0]}")
    return "\n".join(lines)
