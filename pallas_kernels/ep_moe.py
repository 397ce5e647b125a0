"""Expert-parallel routed experts: token dispatch and combine with JAX collectives inside `jax.shard_map`.

Same math as `reference.moe_experts` (the contract), spread over a device mesh with axes ("data", "expert",
"tensor"); a missing axis counts as size 1.

Layout (ep = size of "expert", tp = size of "tensor", dp = size of "data"):
  * routed expert weights [E, N, K]: E split over "expert" (E/ep local experts per device); the expert hidden
    dim I split over "tensor" when it divides (w1/w3 on N, w2 on K), so a (1, 2, 4) mesh spreads experts over
    all eight devices; replicated over "data". Every leaf of a quantized weight (codes, block scales, global and
    input scales) is split along the same logical dims (`weight_specs`).
  * tokens x [T, D]: padded per data group to a multiple of ep and split over ("data", "expert"): each expert
    rank owns a chunk of C tokens (replicated over "tensor").

Per device, for its C tokens and k routing slots (M = C*k rows):
  1. sort the rows by global expert id (= by destination rank, then local expert); count rows per
     (destination, local expert);
  2. dispatch: send each destination its rows (token vector + routing weight) with `ragged_all_to_all`
     (GPU) or an exact fixed-block `all_to_all` (CPU: XLA:CPU has no ragged-all-to-all); the per-expert
     counts travel with one small `all_to_all`;
  3. run the local experts on the received rows, re-sorted by local expert, through
     `dispatch.grouped_linear` (the Hopper kernels on a GPU): gate/up -> clamped SwiGLU x routing weight -> down;
  4. combine: send every result row back to where it came from (the reverse exchange), sum the k slots of each
     token in fp32, and `psum` over "tensor" when the hidden dim is split.

Exactness: nothing is dropped. Buffers have static shapes sized for the worst case (every row of every source
going to one rank: the receive buffer holds dp-local T*k rows); only the filled part travels with the ragged
collective. Padding tokens carry the expert id E, which no rank owns, so they are never sent or computed.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import dispatch, reference

DATA, EXPERT, TENSOR = "data", "expert", "tensor"


# --------------------------------------------------------------------------------------------------------------
# Partition specs for (possibly block-quantized) weights
# --------------------------------------------------------------------------------------------------------------

def axis_size(mesh, name: str) -> int:
    return int(mesh.shape[name]) if name in mesh.axis_names else 1


def _elements_per_entry(logical: int, leaf: int) -> int:
    """How many logical elements one entry of a leaf dim covers: 1 (codes/weights), 2 (packed FP4 codes),
    16/32 (NVFP4/MXFP4 block scales), 128 (FP8 block scales, possibly a ceil). Block sizes are powers of two."""
    if leaf == logical:
        return 1
    r = 1
    while -(-logical // r) != leaf:
        r *= 2
        if r > logical * 2:
            raise ValueError(f"leaf dim {leaf} is not a blocking of logical dim {logical}")
    return r


def dim_splits(logical_dim: int, leaf_dims: Sequence[int], n: int) -> bool:
    """True when a logical dim of size `logical_dim` and every leaf dim tied to it split evenly into n
    pieces at block boundaries (a shard never cuts a packed byte or a scale block)."""
    if n == 1:
        return True
    if logical_dim % n:
        return False
    local = logical_dim // n
    for leaf in leaf_dims:
        if leaf == 1:
            continue
        if local % _elements_per_entry(logical_dim, leaf) or leaf % n:
            return False
    return True


def _leaves(w) -> list:
    return jax.tree_util.tree_leaves(w)


def logical_shape(w) -> tuple[int, ...]:
    return tuple(int(s) for s in w.shape)


def weight_specs(w, logical_spec: Sequence, mesh, *, required: Sequence[bool] | None = None,
                 name: str = "weight"):
    """PartitionSpecs for every leaf of a plain or quantized weight, following one logical spec.

    `logical_spec[d]` is a mesh axis name (or None) for logical dim d of `w.shape`. Leaf dims align with the
    logical dims from the left (packed codes [E, N, K/2], block scales [E, N, K/16], global scale [E, 1] or
    [E, N] or (), input scale [E] or ()); a leaf dim of size 1 is replicated. A logical dim that does not split
    evenly at block boundaries is replicated instead, unless `required[d]` is set, which raises ValueError.

    Returns (list of PartitionSpec, one per leaf in `jax.tree_util.tree_leaves(w)` order, the effective
    logical spec as a tuple).
    """
    shape = logical_shape(w)
    if len(logical_spec) > len(shape):
        raise ValueError(f"{name}: spec {tuple(logical_spec)} has more dims than the weight's shape {shape}")
    spec = tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))
    required = tuple(required or ()) + (False,) * (len(shape) - len(tuple(required or ())))
    leaves = _leaves(w)
    effective = []
    for d, axis in enumerate(spec):
        if axis is None:
            effective.append(None)
            continue
        n = math.prod(axis_size(mesh, a) for a in (axis if isinstance(axis, tuple) else (axis,)))
        tied = [leaf.shape[d] for leaf in leaves if leaf.ndim > d and leaf.shape[d] != 1]
        if dim_splits(shape[d], tied, n):
            effective.append(axis if n > 1 else None)
        elif required[d]:
            raise ValueError(f"{name}: dim {d} of shape {shape} (leaf dims {tied}) does not split into {n} "
                             f"shards over mesh axis {axis!r} at block boundaries")
        else:
            effective.append(None)

    def leaf_spec(leaf):
        return P(*[effective[d] if leaf.shape[d] != 1 else None for d in range(leaf.ndim)])

    return [leaf_spec(leaf) for leaf in leaves], tuple(effective)


def _block_along(w, dim: int) -> int:
    """Largest number of logical elements one leaf entry covers along logical dim `dim` (1 for plain weights)."""
    logical = logical_shape(w)[dim]
    return max([_elements_per_entry(logical, leaf.shape[dim]) for leaf in _leaves(w)
                if leaf.ndim > dim and leaf.shape[dim] != 1] or [1])


def expert_hidden_splits(w, hidden_dim: int, mesh) -> bool:
    """Whether the expert hidden dim I (dim 1 of w1/w3, dim 2 of w2) is split over "tensor".

    I/tp must be a multiple of the weight's block size along BOTH matrix dims, so w1/w3 (I on N) and w2 (I on K)
    of one format always agree: the shard_map needs all three split or none."""
    tp = axis_size(mesh, TENSOR)
    if tp == 1:
        return False
    i = logical_shape(w)[hidden_dim]
    block = max(_block_along(w, 1), _block_along(w, 2))
    tied = [leaf.shape[hidden_dim] for leaf in _leaves(w) if leaf.ndim > hidden_dim and leaf.shape[hidden_dim] != 1]
    return i % tp == 0 and (i // tp) % block == 0 and dim_splits(i, tied, tp)


def expert_weight_spec(w, kind: str, mesh, *, split_hidden: bool | None = None):
    """Leaf specs of one stacked expert weight: kind "w1"/"w3" ([E, I, D]) or "w2" ([E, D, I]).
    E over "expert" (must divide: ValueError otherwise); I over "tensor" per `expert_hidden_splits`."""
    if kind not in ("w1", "w3", "w2"):
        raise ValueError(f"expert weight kind must be w1, w3 or w2, got {kind!r}")
    hidden_dim = 2 if kind == "w2" else 1
    e = logical_shape(w)[0]
    ep = axis_size(mesh, EXPERT)
    if e % ep:
        raise ValueError(f"{e} routed experts do not split over {ep} expert-parallel devices")
    if split_hidden is None:
        split_hidden = expert_hidden_splits(w, hidden_dim, mesh)
    t = TENSOR if split_hidden else None
    spec = (EXPERT, None, t) if kind == "w2" else (EXPERT, t, None)
    return weight_specs(w, spec, mesh, required=(True, False, False), name=f"experts.{kind}")[0]


def expert_weight_specs(w1, w3, w2, mesh):
    """Leaf specs for stacked routed experts w1/w3 [E, I, D], w2 [E, D, I] and whether I is split over
    "tensor" (only when all three allow it)."""
    split = (expert_hidden_splits(w1, 1, mesh) and expert_hidden_splits(w3, 1, mesh)
             and expert_hidden_splits(w2, 2, mesh))
    specs = tuple(expert_weight_spec(w, kind, mesh, split_hidden=split)
                  for w, kind in ((w1, "w1"), (w3, "w3"), (w2, "w2")))
    return specs, split


# --------------------------------------------------------------------------------------------------------------
# Ragged exchange: lax.ragged_all_to_all, or an exact emulation with a fixed-block all_to_all
# --------------------------------------------------------------------------------------------------------------

def _exclusive_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis) - a


def _ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis: str,
                     block: int, ragged: bool):
    """`lax.ragged_all_to_all` semantics (one slice per peer). The dense form sends every peer a [block, W]
    buffer (block = the most rows one peer can be sent) and scatters the filled rows into `output` at the
    offsets the sender chose; it moves more bytes but is exact and runs where ragged-all-to-all does not."""
    if ragged:
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axis)
    n = send_sizes.shape[0]
    j = jnp.arange(block, dtype=jnp.int32)
    src = jnp.clip(input_offsets[:, None] + j[None, :], 0, operand.shape[0] - 1)          # [n, block]
    blocks = jnp.where((j[None, :] < send_sizes[:, None])[..., None], operand[src], 0)  # [n, block, W]
    got = jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True)                            # [n(src), block, W]
    where_to = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)               # [n(src)]
    rows = jnp.where(j[None, :] < recv_sizes[:, None], where_to[:, None] + j[None, :], output.shape[0])
    return output.at[rows.reshape(-1)].set(got.reshape(n * block, -1), mode="drop")


# Routing weights (fp32) travel in the same rows as the token vectors, bit-cast to the activation dtype.
def _pack(xs, wts):
    width = 4 // xs.dtype.itemsize
    wbits = jax.lax.bitcast_convert_type(wts, xs.dtype).reshape(xs.shape[0], width)
    return jnp.concatenate([xs, wbits], axis=1)


def _unpack(rows, d):
    bits = rows[:, d:]
    wts = jax.lax.bitcast_convert_type(bits if bits.shape[1] > 1 else bits[:, 0], jnp.float32)
    return rows[:, :d], wts


# --------------------------------------------------------------------------------------------------------------
# The per-device body
# --------------------------------------------------------------------------------------------------------------

def _local_moe(x, idx, wt, w1, w3, w2, *, swiglu_limit, ep, tensor_split, ragged, combine_dtype, out_dtype):
    c, k = idx.shape                                    # x [C, D], idx/wt [C, k]
    d = x.shape[1]
    e_loc = w1.shape[0]
    m = c * k
    rank = jax.lax.axis_index(EXPERT)

    # 1. sort this chunk's (token, slot) rows by global expert id = by destination rank, then local expert.
    flat = idx.reshape(-1).astype(jnp.int32)                                 # [M]; E marks a padding row
    valid = flat < e_loc * ep
    order = jnp.argsort(jnp.where(valid, flat, e_loc * ep), stable=True)     # [M]
    counts = jnp.bincount(jnp.where(valid, flat, 0), weights=valid.astype(jnp.int32),
                          length=e_loc * ep).astype(jnp.int32).reshape(ep, e_loc)  # [ep(dst), E_loc]
    send = counts.sum(1)                                                     # [ep]
    table = jax.lax.all_gather(send, EXPERT)                                 # [ep(src), ep(dst)] rows s->j
    in_off = _exclusive_cumsum(send)
    out_off = _exclusive_cumsum(table, axis=0)[rank]     # where my block lands in each receiver's buffer
    recv = table[:, rank]                                                    # [ep(src)]
    recv_off = _exclusive_cumsum(recv)
    back_off = _exclusive_cumsum(table, axis=1)[:, rank]  # where each source had put its block for me

    # 2. dispatch rows (token vector + routing weight) to the ranks owning their experts.
    payload = _pack(x[order // k], wt.reshape(-1).astype(jnp.float32)[order])  # [M, D + w]
    r_cap = ep * m                                       # worst case: every source sends me all its rows
    got = _ragged_exchange(payload, jnp.zeros((r_cap, payload.shape[1]), payload.dtype), in_off, send, out_off,
                           recv, axis=EXPERT, block=m, ragged=ragged)           # [R, D + w]
    counts_in = jax.lax.all_to_all(counts, EXPERT, 0, 0, tiled=True)         # [ep(src), E_loc]

    # 3. local experts. Received rows come grouped by source, each group sorted by local expert.
    seg_end = jnp.cumsum(counts_in.reshape(-1))                              # (src, expert) segments
    seg = jnp.searchsorted(seg_end, jnp.arange(r_cap, dtype=jnp.int32), side="right")
    local_e = jnp.where(seg < ep * e_loc, seg % e_loc, e_loc)                # [R]; E_loc = empty slot
    perm = jnp.argsort(local_e, stable=True)
    group_sizes = counts_in.sum(0)                                           # [E_loc]
    xs, wts = _unpack(got[perm], d)
    g = dispatch.grouped_linear(xs, w1, group_sizes, out_dtype=jnp.float32)  # [R, I(/tp)]
    u = dispatch.grouped_linear(xs, w3, group_sizes, out_dtype=jnp.float32)
    h = reference.swiglu(g, u, swiglu_limit)          # unweighted: W4A4 scales are calibrated on this
    y = dispatch.grouped_linear(h.astype(x.dtype), w2, group_sizes, out_dtype=jnp.float32)  # [R, D]
    y = y * wts[:, None].astype(jnp.float32)
    y = jnp.zeros_like(y).at[perm].set(y).astype(combine_dtype)              # back to arrival order

    # 4. combine: results go back to the slots they came from; sum the k slots of each token.
    ret = _ragged_exchange(y, jnp.zeros((m, d), combine_dtype), recv_off, recv, back_off, table[rank],
                           axis=EXPERT, block=m, ragged=ragged)                # [M, D] in sorted order
    out = jnp.zeros((m, d), jnp.float32).at[order].set(ret.astype(jnp.float32))
    out = out.reshape(c, k, d).sum(axis=1)                                   # [C, D]
    if tensor_split:
        out = jax.lax.psum(out, TENSOR)
    return out.astype(out_dtype)


# --------------------------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------------------------

def _check(x, w1, w3, w2, topk_idx, topk_weight):
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}")
    if topk_idx.ndim != 2 or topk_idx.shape[0] != x.shape[0] or topk_weight.shape != topk_idx.shape:
        raise ValueError(f"topk_idx {topk_idx.shape} and topk_weight {topk_weight.shape} must both be "
                         f"[T={x.shape[0]}, k]")
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise ValueError(f"topk_idx must be an integer array, got {topk_idx.dtype}")
    e, i, dd = logical_shape(w1)
    if logical_shape(w3) != (e, i, dd) or logical_shape(w2) != (e, dd, i) or dd != x.shape[1]:
        raise ValueError(f"expert weights must be w1, w3 [E, I, D] and w2 [E, D, I] with D = {x.shape[1]}; got "
                         f"{logical_shape(w1)}, {logical_shape(w3)}, {logical_shape(w2)}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")


def _pad_tokens(a, dp, ep, fill):
    """[T, ...] -> [dp * ceil(ceil(T/dp)/ep) * ep, ...]: each data group padded to a multiple of ep in place,
    so a batch already split over "data" keeps its rows on their data group."""
    t = a.shape[0]
    t1 = -(-t // dp) * dp
    a = jnp.pad(a, [(0, t1 - t)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    per = t1 // dp
    per_pad = -(-per // ep) * ep
    a = a.reshape((dp, per) + a.shape[1:])
    a = jnp.pad(a, [(0, 0), (0, per_pad - per)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return a.reshape((dp * per_pad,) + a.shape[2:]), per


def _unpad_tokens(a, t, dp, per):
    a = a.reshape((dp, -1) + a.shape[1:])[:, :per]
    return a.reshape((dp * per,) + a.shape[2:])[:t]


def default_exchange(mesh) -> str:
    """"ragged" on GPUs (NCCL), "dense" elsewhere (XLA:CPU has no ragged-all-to-all); the environment variable
    MEGAMOE_EP_EXCHANGE=ragged|dense overrides it."""
    forced = os.environ.get("MEGAMOE_EP_EXCHANGE")
    if forced:
        return forced
    device = getattr(mesh.abstract_mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "ragged" if platform in ("gpu", "cuda", "rocm") else "dense"


def moe_experts_ep(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, *, mesh, out_dtype=None,
                   combine_dtype=jnp.float32, exchange: str | None = None):
    """Routed experts of one MoE layer, expert-parallel over `mesh` (math of `reference.moe_experts`).

    `mesh`: a `Mesh` or the `AbstractMesh` of `jax.set_mesh` (inside jit).
    x [T, D]; w1, w3 [E, I, D]; w2 [E, D, I] (plain arrays or quantized pytrees, ideally already placed with
    `expert_weight_specs`); topk_idx [T, k] int in [0, E); topk_weight [T, k]. Returns [T, D] in out_dtype
    (default x.dtype). `combine_dtype` is the dtype of the returned expert rows (fp32: exact to the reference
    up to summation order; bf16 halves the combine traffic). `exchange`: "ragged" | "dense" | None (auto).
    """
    _check(x, w1, w3, w2, topk_idx, topk_weight)
    if EXPERT not in mesh.axis_names:
        raise ValueError(f"mesh needs an {EXPERT!r} axis, has {mesh.axis_names}")
    extra = set(mesh.axis_names) - {DATA, EXPERT, TENSOR}
    if extra:
        raise ValueError(f"mesh axes must be among ({DATA!r}, {EXPERT!r}, {TENSOR!r}); got extra {sorted(extra)}")
    exchange = exchange or default_exchange(mesh)
    if exchange not in ("ragged", "dense"):
        raise ValueError(f"exchange must be 'ragged' or 'dense', got {exchange!r}")
    out_dtype = out_dtype or x.dtype
    e = logical_shape(w1)[0]
    dp, ep = axis_size(mesh, DATA), axis_size(mesh, EXPERT)
    (s1, s3, s2), tensor_split = expert_weight_specs(w1, w3, w2, mesh)

    t = x.shape[0]
    xp, per = _pad_tokens(x, dp, ep, 0)
    ip, _ = _pad_tokens(topk_idx.astype(jnp.int32), dp, ep, e)       # padding rows route to no expert
    wp, _ = _pad_tokens(topk_weight, dp, ep, 0)

    leaves, trees, specs = [], [], []
    for w, s in ((w1, s1), (w3, s3), (w2, s2)):
        lw, tw = jax.tree_util.tree_flatten(w)
        leaves.append(lw)
        trees.append(tw)
        specs.append(list(s))

    tok = P((DATA, EXPERT) if DATA in mesh.axis_names else EXPERT, None)

    def body(xl, il, wl, l1, l3, l2):
        ws = [jax.tree_util.tree_unflatten(tr, lv) for tr, lv in zip(trees, (l1, l3, l2))]
        return _local_moe(xl, il, wl, *ws, swiglu_limit=swiglu_limit, ep=ep, tensor_split=tensor_split,
                          ragged=exchange == "ragged", combine_dtype=combine_dtype, out_dtype=out_dtype)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, *specs), out_specs=tok, check_vma=False)
    out = fn(xp, ip, wp, *leaves)
    return _unpad_tokens(out, t, dp, per)
