"""Loss registry: parity with PyTorch / segmentation_models_pytorch / a numpy OHEM, ignore-label
handling, gradients, class weights, the expression parser and build_loss."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import losses

# smp imports torchvision, whose wheel is a CUDA build: pre-register its compiled-op modules.
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_name, types.ModuleType(_name))

torch = pytest.importorskip("torch")
smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
F = torch.nn.functional

IGNORE = 255
NUM_CLASSES = 4
WEIGHTS = (0.5, 2.0, 1.0, 3.0)
TOL = 1e-5  # parity tolerance for values and gradients (float64 except smp's Lovász)


def _inputs(seed=0, shape=(2, 6, 7), num_classes=NUM_CLASSES, absent=None, scale=2.0):
    """Random float64 logits [B, H, W, C] and labels [B, H, W] with ~20% ignored pixels."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal(shape + (num_classes,))
    classes = [c for c in range(num_classes) if c != absent]
    labels = rng.choice(classes, size=shape)
    labels[rng.random(shape) < 0.2] = IGNORE
    return logits, labels


def _torch(logits, labels):
    """NCHW float64 logits and int64 labels for the PyTorch references."""
    return (
        torch.from_numpy(np.moveaxis(logits, -1, 1).copy()),
        torch.from_numpy(labels.astype(np.int64)),
    )


def _jax(name, logits, labels, **kwargs):
    """Evaluates a registered loss in float64 and returns a Python float."""
    with jax.enable_x64(True):
        return float(losses.LOSSES[name](jnp.asarray(logits), jnp.asarray(labels), **kwargs))


def _assert_parity(name, kwargs, reference, logits, labels, reference_float32=False):
    """The loss and its gradient w.r.t. the logits agree with a PyTorch reference."""
    torch_logits, torch_labels = _torch(logits, labels)
    if reference_float32:
        torch_logits = torch_logits.float()
    torch_logits.requires_grad_(True)
    expected = reference(torch_logits, torch_labels)
    expected.backward()
    expected_grad = np.moveaxis(torch_logits.grad.double().numpy(), 1, -1)
    with jax.enable_x64(True):

        def fn(x):
            return losses.LOSSES[name](x, jnp.asarray(labels), **kwargs)

        value, grad = jax.value_and_grad(fn)(jnp.asarray(logits))
    assert abs(float(value) - expected.item()) <= TOL, (float(value), expected.item())
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("class_weights", [None, WEIGHTS])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(class_weights, label_smoothing):
    logits, labels = _inputs(seed=1)
    weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float64)

    def reference(x, y):
        return F.cross_entropy(
            x, y, weight=weight, ignore_index=IGNORE, label_smoothing=label_smoothing
        )

    kwargs = {"class_weights": class_weights, "label_smoothing": label_smoothing}
    _assert_parity("cross_entropy", kwargs, reference, logits, labels)


def test_cross_entropy_smoothing_is_optax_smoothing():
    import optax

    logits, labels = _inputs(seed=2, absent=None)
    labels = np.where(labels == IGNORE, 0, labels)  # no ignored pixels: plain optax mean
    with jax.enable_x64(True):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, NUM_CLASSES), 0.2)
        expected = float(optax.softmax_cross_entropy(jnp.asarray(logits), targets).mean())
    assert abs(_jax("cross_entropy", logits, labels, label_smoothing=0.2) - expected) < 1e-12


@pytest.mark.parametrize("class_weights", [None, WEIGHTS])
@pytest.mark.parametrize("absent", [None, 2])
def test_dice_matches_smp(class_weights, absent):
    logits, labels = _inputs(seed=4, absent=absent)
    reference = smp_losses.DiceLoss(
        mode="multiclass", from_logits=True, ignore_index=IGNORE, class_weights=class_weights
    )
    _assert_parity("dice", {"class_weights": class_weights}, reference, logits, labels)


@pytest.mark.parametrize("absent", [None, 1])
def test_lovasz_matches_smp(absent):
    logits, labels = _inputs(seed=5, absent=absent)
    reference = smp_losses.LovaszLoss(mode="multiclass", per_image=False, ignore_index=IGNORE)
    # smp computes the Lovász gradient with `.float()`, so it only runs in float32 (agreement
    # with this float64 computation is ~1e-7).
    _assert_parity("lovasz", {}, reference, logits, labels, reference_float32=True)


def test_lovasz_static_shape_equals_dropping_ignored_pixels():
    """Ignored pixels kept with error 0 and foreground 0 give the value of removing them, also
    with many tied errors (logits quantised to a few values)."""
    for seed, scale in [(6, 2.0), (7, 0.0), (8, 1.0)]:
        logits, labels = _inputs(seed=seed, scale=scale)
        logits = np.round(logits)  # ties everywhere
        valid = labels != IGNORE
        dropped = _jax("lovasz", logits[valid][None, None], labels[valid][None, None])
        kept = _jax("lovasz", logits, labels)
        assert abs(kept - dropped) < 1e-12, (seed, kept, dropped)


@pytest.mark.parametrize("class_weights", [None, WEIGHTS])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_focal_matches_smp(class_weights, gamma):
    logits, labels = _inputs(seed=9)
    reference = smp_losses.FocalLoss(
        mode="multiclass", gamma=gamma, ignore_index=IGNORE, class_weights=class_weights
    )
    kwargs = {"class_weights": class_weights, "gamma": gamma}
    _assert_parity("focal", kwargs, reference, logits, labels)


def _ohem_numpy(logits, labels, thresh, min_kept, class_weights=None):
    """MMSegmentation's OHEMPixelSampler selection + weighted mean CE over the kept pixels,
    written with boolean indexing. Returns (loss, number of kept pixels, threshold used)."""
    weights = np.ones(logits.shape[-1]) if class_weights is None else np.asarray(class_weights)
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    valid = labels != IGNORE
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    lp = log_probs[valid, labels[valid]]
    prob = np.exp(lp)
    batch_kept = min_kept * 2  # B = 2
    threshold = max(thresh, np.sort(prob)[min(batch_kept, prob.size - 1)])
    kept = prob < threshold
    w = weights[labels[valid]][kept]
    return float(np.sum(-lp[kept] * w) / np.sum(w)), int(kept.sum()), threshold


@pytest.mark.parametrize(
    "thresh, min_kept, regime",
    [
        (0.05, 20, "min_kept"),  # fewer than 40 pixels have p < 0.05: the 41st smallest p rules
        (0.7, 3, "thresh"),  # many pixels have p < 0.7, more than 6
        (0.7, 10_000, "all_but_one"),  # k >= n: threshold is the largest p, all others kept
    ],
)
@pytest.mark.parametrize("class_weights", [None, WEIGHTS])
def test_ohem_matches_numpy(thresh, min_kept, regime, class_weights):
    logits, labels = _inputs(seed=10)
    expected, num_kept, threshold = _ohem_numpy(logits, labels, thresh, min_kept, class_weights)
    num_valid = int((labels != IGNORE).sum())
    if regime == "min_kept":
        assert threshold > thresh and num_kept == 2 * min_kept
    elif regime == "thresh":
        assert threshold == thresh and 2 * min_kept < num_kept < num_valid
    else:
        assert num_kept == num_valid - 1
    got = _jax(
        "ohem_cross_entropy",
        logits,
        labels,
        thresh=thresh,
        min_kept=min_kept,
        class_weights=class_weights,
    )
    assert abs(got - expected) < 1e-10, (got, expected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_ohem_keeping_everything_is_cross_entropy(label_smoothing):
    logits, labels = _inputs(seed=11)
    kwargs = {"class_weights": WEIGHTS, "label_smoothing": label_smoothing}
    ohem = _jax("ohem_cross_entropy", logits, labels, thresh=1.1, min_kept=1, **kwargs)
    assert abs(ohem - _jax("cross_entropy", logits, labels, **kwargs)) < 1e-12


# ----------------------------------------------------------------------------- every loss


@pytest.mark.parametrize("name", losses.list_losses())
def test_every_loss_ignores_ignored_pixels_and_has_finite_gradients(name):
    fn = losses.LOSSES[name]
    logits, labels = _inputs(seed=12)
    ignored = labels == IGNORE
    assert ignored.any()
    other = np.where(
        ignored[..., None], 50.0 * np.random.default_rng(0).standard_normal(logits.shape), logits
    )
    with jax.enable_x64(True):
        value_and_grad = jax.value_and_grad(lambda x: fn(x, jnp.asarray(labels)))
        value, grad = value_and_grad(jnp.asarray(logits))
        other_value, other_grad = value_and_grad(jnp.asarray(other))
    assert abs(float(value) - float(other_value)) < 1e-12
    for g in (np.asarray(grad), np.asarray(other_grad)):
        assert np.all(np.isfinite(g))
        assert np.all(g[ignored] == 0)
        assert np.any(g[~ignored] != 0)


@pytest.mark.parametrize("name", losses.list_losses())
def test_every_loss_float32_bfloat16_and_all_ignored(name):
    """Registry contract: keyword-only ignore_label/class_weights, scalar float32 result for
    float32/bfloat16 logits, and 0 with a finite gradient when no pixel is valid."""
    fn = losses.LOSSES[name]
    import inspect

    parameters = inspect.signature(fn).parameters
    for key in ("ignore_label", "class_weights"):
        assert parameters[key].kind is inspect.Parameter.KEYWORD_ONLY
    logits, labels = _inputs(seed=13)
    reference = _jax(name, logits, labels)
    for dtype, tol in [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)]:
        value = fn(jnp.asarray(logits, dtype), jnp.asarray(labels))
        assert value.shape == () and value.dtype == jnp.float32
        assert abs(float(value) - reference) <= tol * max(1.0, reference), (dtype, value)
    all_ignored = jnp.full(labels.shape, IGNORE)
    value, grad = jax.value_and_grad(lambda x: fn(x, all_ignored))(jnp.asarray(logits, jnp.float32))
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("name", losses.list_losses())
def test_every_loss_class_weights(name):
    logits, labels = _inputs(seed=14)
    ones = _jax(name, logits, labels, class_weights=(1.0,) * NUM_CLASSES)
    assert abs(ones - _jax(name, logits, labels)) < 1e-12
    if name == "ohem_cross_entropy":
        return  # zeroing a class also changes which pixels OHEM selects; covered vs numpy above
    zero_two = (1.0, 1.0, 0.0, 1.0)
    weighted = _jax(name, logits, labels, class_weights=zero_two)
    if name == "cross_entropy":
        # A zero weight removes the class's pixels from both sums: as if they were ignored.
        expected = _jax(name, logits, np.where(labels == 2, IGNORE, labels))
    else:
        # Σ w[c]·loss_c / Σ w[c], where loss_c is the value with the one-hot weight e_c.
        eye = np.eye(NUM_CLASSES)
        per_class = [_jax(name, logits, labels, class_weights=tuple(e)) for e in eye]
        expected = float(np.dot(zero_two, per_class) / np.sum(zero_two))
        general = float(np.dot(WEIGHTS, per_class) / np.sum(WEIGHTS))
        assert abs(_jax(name, logits, labels, class_weights=WEIGHTS) - general) < 1e-12
    assert abs(weighted - expected) < 1e-12, (weighted, expected)


# ----------------------------------------------------------------------------- expressions


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("cross_entropy", [(1.0, "cross_entropy")]),
        ("cross_entropy+0.5*dice", [(1.0, "cross_entropy"), (0.5, "dice")]),
        (
            "0.7*ohem_cross_entropy + 0.3 * lovasz",
            [(0.7, "ohem_cross_entropy"), (0.3, "lovasz")],
        ),
        (
            "  1e-2*focal+.5*dice + 2.*cross_entropy ",
            [(0.01, "focal"), (0.5, "dice"), (2.0, "cross_entropy")],
        ),
        ("1E+1 * lovasz", [(10.0, "lovasz")]),
    ],
)
def test_parse_loss_valid(expression, expected):
    assert losses.parse_loss(expression) == expected


@pytest.mark.parametrize(
    "expression, words",
    [
        ("", ["empty", "cross_entropy, dice"]),
        ("   ", ["empty"]),
        (
            "crossentropy",
            ["Unknown loss 'crossentropy'", "--config.loss", ", ".join(losses.list_losses())],
        ),
        ("cross_entropy+0.5*dcie", ["Unknown loss 'dcie'"]),
        ("cross_entropy+", ["Malformed", "'cross_entropy+'", "'+'"]),
        ("cross_entropy 0.5*dice", ["Malformed", "expected"]),
        ("0.5 dice", ["Malformed", "'weight*name'"]),
        ("dice*0.5", ["Malformed"]),
        ("cross_entropy++dice", ["Malformed"]),
        ("cross_entropy-0.5*dice", ["Malformed"]),
        ("0*dice", ["weight 0", "positive finite"]),
        ("cross_entropy+-1*dice", ["weight -1", "positive finite"]),
        ("1e999*dice", ["positive finite"]),
        ("inf*dice", ["positive finite"]),
        ("nan*dice", ["positive finite"]),
        ("dice+0.5*dice", ["'dice' appears more than once"]),
    ],
)
def test_parse_loss_errors(expression, words):
    with pytest.raises(ValueError) as info:
        losses.parse_loss(expression)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def test_build_loss_total_is_weighted_sum_and_options_reach_their_loss():
    logits, labels = _inputs(seed=15)
    logits32, labels32 = jnp.asarray(logits, jnp.float32), jnp.asarray(labels)
    options = {"label_smoothing": 0.1, "ohem_thresh": 0.6, "ohem_min_kept": 5, "focal_gamma": 1.0}
    loss_fn = losses.build_loss(
        "0.7*ohem_cross_entropy + 0.3*lovasz + cross_entropy + .5*dice + 2*focal",
        num_classes=NUM_CLASSES,
        class_weights=WEIGHTS,
        **options,
    )
    total, terms = jax.jit(loss_fn)(logits32, labels32)
    kw = {"class_weights": WEIGHTS}
    expected = {
        "ohem_cross_entropy": losses.ohem_cross_entropy(
            logits32, labels32, thresh=0.6, min_kept=5, label_smoothing=0.1, **kw
        ),
        "lovasz": losses.lovasz(logits32, labels32, **kw),
        "cross_entropy": losses.cross_entropy(logits32, labels32, label_smoothing=0.1, **kw),
        "dice": losses.dice(logits32, labels32, **kw),
        "focal": losses.focal(logits32, labels32, gamma=1.0, **kw),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-6, err_msg=name)
    weights = {"ohem_cross_entropy": 0.7, "lovasz": 0.3, "cross_entropy": 1.0, "dice": 0.5}
    weights["focal"] = 2.0
    np.testing.assert_allclose(total, sum(weights[n] * terms[n] for n in terms), rtol=1e-6)
    # The options changed the values (so they were passed, and only where they belong).
    assert not np.isclose(terms["focal"], losses.focal(logits32, labels32, **kw))
    assert not np.isclose(terms["cross_entropy"], losses.cross_entropy(logits32, labels32, **kw))


def test_build_loss_empty_class_weights_mean_unweighted():
    logits, labels = _inputs(seed=17)
    logits32, labels32 = jnp.asarray(logits, jnp.float32), jnp.asarray(labels)
    _, terms = losses.build_loss("dice+focal", num_classes=NUM_CLASSES, class_weights=())(
        logits32, labels32
    )
    np.testing.assert_allclose(terms["dice"], losses.dice(logits32, labels32), rtol=1e-6)
    np.testing.assert_allclose(terms["focal"], losses.focal(logits32, labels32), rtol=1e-6)


def test_build_loss_ignore_label_is_passed():
    logits, labels = _inputs(seed=16)
    labels = np.where(labels == IGNORE, 7, labels)
    loss_fn = losses.build_loss("cross_entropy+dice", num_classes=NUM_CLASSES, ignore_label=7)
    _, terms = loss_fn(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(
        terms["dice"], _jax("dice", logits, np.where(labels == 7, IGNORE, labels)), rtol=1e-5
    )


def test_build_loss_errors():
    with pytest.raises(ValueError, match=r"--config.class_weights has 3 values but there are 4"):
        losses.build_loss("cross_entropy", num_classes=4, class_weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"--config.class_weights must be finite and non-neg"):
        losses.build_loss("dice", num_classes=4, class_weights=(1.0, -1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        losses.build_loss("cross_entropy", num_classes=4, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"Unknown loss 'bce'"):
        losses.build_loss("bce", num_classes=4)
    loss_fn = losses.build_loss("dice", num_classes=5)
    with pytest.raises(ValueError, match=r"logits have 4 classes .* num_classes=5"):
        loss_fn(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2), jnp.int32))
