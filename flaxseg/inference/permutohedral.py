"""Permutohedral-lattice Gaussian filtering (Adams, Baek & Davis, Eurographics 2010) in JAX.

The filter computes, for features ``f [N, d]`` and values ``v [N, C]``, an approximation of the
Gaussian transform ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (the pixel's own term
included) in O(N d^2) work by splatting the values onto the vertices of the permutohedral
lattice, blurring them along its d + 1 axes and slicing them back.

It follows Krähenbühl's ``permutohedral.cpp`` (densecrf, as built by pydensecrf) step for step:
the elevation with the expected-std factor ``sqrt(2/3) (d + 1)``, rounding to the closest
remainder-0 point, the rank sort, barycentric weights, the ``[1/2, 1, 1/2]`` blur along the
axes 0..d and the slicing constant ``1 / (1 + 2^-d)``. Only the hash table differs: XLA needs
static shapes, so the lattice has the static capacity ``M = N (d + 1)`` (every pixel's d + 1
vertices), duplicates are merged by a lexicographic sort, and for each axis the vertices are
sorted by the line along that axis they lie on, so that blurring is a shift (see
``_axis_order``). Unused slots hold zeros and are nobody's neighbours, like the C++ ``-1``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Rows per step of the blur loop (see _blur_axis).
BLOCK = 8192


class Lattice(NamedTuple):
    """A permutohedral lattice built for N points with d-dimensional features.

    The lattice has the static capacity M = N (d + 1) slots, padded to whole blocks (M'); the
    ``count`` used ones come first in every order. Besides the slot order of the sort that
    merged duplicate vertices there is one order per blur axis, in which the two neighbours
    along that axis sit side by side.

    splat_index: [N, d + 1] int32, the slot of each of a point's d + 1 enclosing vertices.
    weights: [N, d + 1] float32, the barycentric weights of those vertices (they sum to 1).
    transfers: [d + 1, M' + 2] int32, entry p + 1 of row j: the row of the previous order (the
      slot order for j = 0) that becomes row p of the axis-j order; M' (the zero row) at the
      edges.
    adjacent: [d + 1, M' + 1] bool, entry p + 1 of row j: rows p and p + 1 of the axis-j order
      are neighbours.
    slice_index: [N, d + 1] int32, where the vertices sit in the axis-d order.
    count: int32 scalar, the number of distinct vertices.
    """

    splat_index: jax.Array
    weights: jax.Array
    transfers: jax.Array
    adjacent: jax.Array
    slice_index: jax.Array
    count: jax.Array


def _elevate(features: jax.Array) -> jax.Array:
    """Features [N, d] -> elevated positions [N, d + 1] on the plane sum(x) = 0 (E p, p. 5)."""
    d = features.shape[1]
    # float32 constants computed as permutohedral.cpp computes them (double, then cast).
    inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * (d + 1))
    scale = [
        np.float32(1.0 / np.sqrt((i + 2) * (i + 1)) * np.float64(inv_std_dev)) for i in range(d)
    ]
    elevated = [None] * (d + 1)
    running_sum = jnp.zeros(features.shape[:1], jnp.float32)
    for j in range(d, 0, -1):
        scaled = features[:, j - 1] * scale[j - 1]
        elevated[j] = running_sum - np.float32(j) * scaled
        running_sum = running_sum + scaled
    elevated[0] = running_sum
    return jnp.stack(elevated, axis=1)


def _simplex(elevated: jax.Array):
    """Elevated [N, d + 1] -> (vertex keys [N, d + 1, d + 1] int32, barycentric [N, d + 1])."""
    n, d1 = elevated.shape
    d = d1 - 1
    down = np.float32(1.0 / d1)
    # Closest remainder-0 point; jnp.round rounds half to even like the SSE conversion.
    v = jnp.round(elevated * down)
    rem0 = v * np.float32(d1)
    total = jnp.sum(v, axis=1, keepdims=True)
    # rank[i] = position of coordinate i in the decreasing order of (elevated - rem0), with
    # ties broken as in the C++ double loop (i < j: rank[i]++ if di < dj, else rank[j]++).
    diff = elevated - rem0
    di, dj = diff[:, :, None], diff[:, None, :]
    upper = np.triu(np.ones((d1, d1), bool), k=1)  # pairs i < j
    rank = jnp.sum(upper & (di < dj), axis=2) + jnp.sum(upper.T & ~(dj < di), axis=2)
    rank = rank.astype(jnp.float32) + total
    shift = jnp.where(rank < 0, np.float32(d1), 0.0) - jnp.where(rank >= d1, np.float32(d1), 0.0)
    rank = (rank + shift).astype(jnp.int32)
    rem0 = rem0 + shift
    # Barycentric coordinates (p. 10): every slot gets at most one + and one - term.
    bary_v = (elevated - rem0) * down
    position = d - rank
    plus = jnp.sum(jax.nn.one_hot(position, d + 2, dtype=jnp.float32) * bary_v[..., None], axis=1)
    minus = jnp.sum(jax.nn.one_hot(position + 1, d + 2, dtype=jnp.float32) * bary_v[..., None], 1)
    bary = plus - minus
    bary = bary.at[:, 0].set(bary[:, 0] + (1.0 + bary[:, d + 1]))[:, : d + 1]
    # Vertex r of the enclosing simplex: rem0 + canonical[r, rank], canonical[r, k] = r if
    # k <= d - r else r - (d + 1).
    r = np.arange(d1)[:, None]
    k = np.arange(d1)[None, :]
    canonical = np.where(k <= d - r, r, r - d1).astype(np.int32)  # [d + 1 (r), d + 1 (k)]
    keys = rem0.astype(jnp.int32)[:, None, :] + jnp.asarray(canonical)[:, rank].transpose(1, 0, 2)
    assert keys.shape == (n, d1, d1)
    return keys, bary


def _key_bits(feature_ranges, d: int):
    """Static bit widths that hold each vertex coordinate's spread, or None (32 each).

    feature_ranges bounds max - min of every feature; the elevated coordinates are linear in
    the features and a vertex coordinate is within 3 (d + 1) of its elevated coordinate.
    """
    if feature_ranges is None:
        return None
    inv_std_dev = np.sqrt(2.0 / 3.0) * (d + 1)
    scale = inv_std_dev / np.sqrt((np.arange(d) + 2.0) * (np.arange(d) + 1.0))
    coeff = np.zeros((d + 1, d))  # elevated = coeff @ features
    for j in range(d + 1):
        coeff[j, j:] = scale[j:]
        if j > 0:
            coeff[j, j - 1] = -j * scale[j - 1]
    spread = np.abs(coeff) @ np.asarray(feature_ranges, np.float64) + 6 * (d + 1) + 2
    return [int(np.ceil(np.log2(s + 1))) for s in spread]


def _pack(fields, bits):
    """Int32 fields [P] (most significant first) -> uint32 words that sort like the tuple.

    Each field is shifted by its minimum and given ``bits`` bits (32 when None); fields are
    packed greedily into 32-bit words, so lexicographic order over the words is the order of
    the field tuple.
    """
    words, word, used = [], None, 0
    for field, width in zip(fields, bits):
        width = 32 if width is None else width
        value = (field - jnp.min(field)).astype(jnp.uint32)
        if word is not None and used + width <= 32:
            word, used = (word << np.uint32(width)) | value, used + width
        else:
            if word is not None:
                words.append(word)
            word, used = value, width
    words.append(word)
    return words


def _sort_by(fields, bits, payload):
    words = _pack(fields, bits)
    return jax.lax.sort((*words, payload), num_keys=len(words))


def _dedup(keys: jax.Array, bits):
    """Keys [P, d + 1] -> (slot of each key [P], unique keys [P, d + 1], valid slot mask [P])."""
    p, d1 = keys.shape
    # The last coordinate is minus the sum of the others (the lattice lies on sum(x) = 0).
    fields = [keys[:, i] for i in range(d1 - 1)]
    field_bits = [None] * (d1 - 1) if bits is None else bits[: d1 - 1]
    sorted_ops = _sort_by(fields, field_bits, jnp.arange(p, dtype=jnp.int32))
    perm = sorted_ops[-1]
    sorted_words = jnp.stack(sorted_ops[:-1], axis=1)
    is_new = jnp.concatenate(
        [jnp.ones((1,), bool), jnp.any(sorted_words[1:] != sorted_words[:-1], axis=1)]
    )
    slot_sorted = jnp.cumsum(is_new.astype(jnp.int32)) - 1
    slots = jnp.zeros((p,), jnp.int32).at[perm].set(slot_sorted)
    unique_keys = jnp.zeros((p, d1), jnp.int32).at[slot_sorted].set(keys[perm])
    valid = jnp.arange(p) <= slot_sorted[-1]
    return slots, unique_keys, valid


def _axis_order(unique_keys: jax.Array, valid: jax.Array, axis: int, bits):
    """Orders the slots so that the blur neighbours along ``axis`` are side by side.

    The neighbours of a vertex are key +- u_axis, u_axis = (d + 1) e_axis - 1. Along u_axis
    the coordinate r = axis + 1 (mod d + 1) drops by one per step, so t = -key[r] is the
    position on the line and w = key + key[r] u_axis is constant on it. Sorting the slots by
    (padding, w, t) puts the two neighbours of a vertex right beside it, which replaces the
    hash look-ups of the C++ code. Returns (order [M] slots, adjacent [M]: order[p] and
    order[p + 1] are neighbours).
    """
    m, d1 = unique_keys.shape
    # Unused slots take slot 0's key (always used), so that they stay within the bit widths.
    unique_keys = jnp.where(valid[:, None], unique_keys, unique_keys[:1])
    ref = (axis + 1) % d1
    k_ref = unique_keys[:, ref]
    # w sums to 0 and w[ref] = 0, so w[axis] follows from the other d - 1 fields.
    fields, field_bits = [(~valid).astype(jnp.int32)], [1]
    for i in range(d1):
        if i not in (ref, axis):
            fields.append(unique_keys[:, i] - k_ref)
            field_bits.append(
                None if bits is None else int(np.ceil(np.log2(2 ** bits[i] + 2 ** bits[ref])))
            )
    fields.append(-k_ref)
    field_bits.append(None if bits is None else bits[ref])
    ops = _sort_by(fields, field_bits, jnp.arange(m, dtype=jnp.int32))
    order = ops[-1]
    valid_sorted = valid[order]
    t_sorted = -k_ref[order]
    # Neighbours: both used, on the same line (every field but t equal), consecutive t.
    same = jnp.ones((m - 1,), bool)
    for field in fields[1:-1]:
        f_sorted = field[order]
        same = same & (f_sorted[1:] == f_sorted[:-1])
    adjacent = same & valid_sorted[1:] & valid_sorted[:-1] & (t_sorted[1:] == t_sorted[:-1] + 1)
    return order, jnp.concatenate([adjacent, jnp.zeros((1,), bool)])


def _block_size(m: int) -> int:
    return min(BLOCK, m)


def build_lattice(features: jax.Array, feature_ranges=None) -> Lattice:
    """Builds the lattice for features [N, d] (already divided by their standard deviations).

    feature_ranges: optional static bound on max - min of every feature (d floats); with it
    the sort keys are packed into fewer 32-bit words, which makes building faster.
    """
    features = jnp.asarray(features, jnp.float32)
    n, d = features.shape
    bits = _key_bits(feature_ranges, d)
    keys, weights = _simplex(_elevate(features))
    slots, unique_keys, valid = _dedup(keys.reshape(n * (d + 1), d + 1), bits)
    m = n * (d + 1)
    block = _block_size(m)
    m_pad = -(-m // block) * block  # whole blocks; row m_pad is the zero row
    orders, adjacent = zip(*[_axis_order(unique_keys, valid, j, bits) for j in range(d + 1)])
    arange = jnp.arange(m, dtype=jnp.int32)
    positions = [jnp.zeros((m,), jnp.int32).at[o].set(arange) for o in orders]
    # transfers[j][p + 1] = row of the previous order (slots for axis 0) that goes to row p.
    sources = [orders[0]] + [positions[j - 1][orders[j]] for j in range(1, d + 1)]
    # Rows past the used ones read the zero row, so that the blur never reads stale rows.
    count = jnp.sum(valid, dtype=jnp.int32)
    sources = [jnp.where(arange < count, src, m_pad) for src in sources]
    edge = jnp.full((1,), m_pad, jnp.int32)
    tail = jnp.full((m_pad - m + 1,), m_pad, jnp.int32)
    transfers = jnp.stack([jnp.concatenate([edge, src, tail]) for src in sources])
    # adjacent[j][p + 1]: rows p and p + 1 of the axis-j order are neighbours.
    no = jnp.zeros((1,), bool)
    flags = [jnp.concatenate([no, a, jnp.zeros((m_pad - m,), bool)]) for a in adjacent]
    slots = slots.reshape(n, d + 1)
    return Lattice(
        splat_index=slots,
        weights=weights,
        transfers=transfers,
        adjacent=jnp.stack(flags),
        slice_index=positions[d][slots],
        count=count,
    )


def _blur_axis(grid, out, transfer, adjacent, count, block: int):
    """One blur pass, gathering the previous order into this axis' order block by block.

    Only the blocks that hold the ``count`` used vertices are written into ``out`` (they come
    first in every order), so the work follows the lattice's real size, not its static
    capacity; the rest of ``out`` is never read (rows past ``count`` read the zero row, the
    last row, which must be zero in ``grid`` and stays untouched in ``out``).
    """

    def body(b, out):
        start = b * block
        rows = grid[jax.lax.dynamic_slice(transfer, (start,), (block + 2,))]  # p - 1 .. p + B
        flags = jax.lax.dynamic_slice(adjacent, (start,), (block + 1,))[:, None]
        # The two neighbours' sum, t + 1 first, as the C++ code adds n1 + n2.
        up = jnp.where(flags[1:], rows[2:], 0.0)
        down = jnp.where(flags[:-1], rows[:-2], 0.0)
        new = rows[1:-1] + 0.5 * (up + down)
        return jax.lax.dynamic_update_slice(out, new, (start, 0))

    blocks = (count + block - 1) // block
    return jax.lax.fori_loop(0, blocks, body, out)


def lattice_filter(lattice: Lattice, values: jax.Array) -> jax.Array:
    """Gaussian-filters values [N, C] on the lattice: splat, blur along axes 0..d, slice."""
    n, d1 = lattice.weights.shape
    m_pad = lattice.transfers.shape[1] - 2
    block = _block_size(n * d1)
    splat = (lattice.weights[:, :, None] * values[:, None, :]).reshape(n * d1, -1)
    grid = jax.ops.segment_sum(splat, lattice.splat_index.reshape(-1), num_segments=m_pad + 1)
    # Ping-pong between two buffers: each pass writes over the one the pass before read.
    spare = jnp.zeros_like(grid)
    for axis in range(d1):
        transfer, adjacent = lattice.transfers[axis], lattice.adjacent[axis]
        grid, spare = _blur_axis(grid, spare, transfer, adjacent, lattice.count, block), grid
    alpha = np.float32(1.0 / (1.0 + 2.0 ** -(d1 - 1)))
    weights = lattice.weights * alpha
    # A sum of d + 1 gathers (in the C++ order), which XLA fuses without materialising
    # an [N, d + 1, C] array.
    out = weights[:, :1] * grid[lattice.slice_index[:, 0]]
    for k in range(1, d1):
        out = out + weights[:, k : k + 1] * grid[lattice.slice_index[:, k]]
    return out
