"""Attention dispatch: one `attend` for every forward, three implementations behind it.

This module owns how causal attention with key padding is computed. Stages that pass a key mask
(PPO's score and update over left-padded prompts, the RM, likelihoods, padded SFT) would
otherwise materialise `[B, N, T, S]` float32 scores per layer, kept for the backward pass unless
rematerialised; a fused kernel keeps them in on-chip memory instead.

Implementations (`ModelConfig.attention`, `--config.model.attention=...`):
  xla     the reference, and the CPU path: explicit boolean mask, float32 logits and softmax.
  splash  TPU: the Pallas splash-attention kernel. The causal (or sliding-window) structure is a
          static block mask, so fully masked blocks are skipped; key padding enters as segment
          ids (real keys 1, padding 0; every query 1). Sequences are zero-padded to a multiple
          of 128 (the kernel's block size) and sliced back; the head dimension is taken whole.
          Under `sharding.use_rules` the kernel runs per shard in a `shard_map` (batch over the
          `act_batch` mesh axes, heads over `act_heads` when they split both N and K evenly).
          On any other platform it runs in Pallas interpret mode (slow; for parity tests).
  cudnn   GPU: `jax.nn.dot_product_attention(implementation="cudnn")` with `is_causal` and a
          sliding window. cuDNN's padding masks take sequence lengths, i.e. right padding only,
          and PPO's prompts are left-padded, so a key mask goes in as jax's additive bias
          `[B, 1, T, S]` in the compute dtype (16-bit, not per head, not float32). It needs
          16-bit inputs, a head dim that is a multiple of 8 and at most 128, and even lengths
          when a mask is given.
  auto    splash on TPU, cudnn on GPU, xla otherwise, wherever the kernel applies.

Where a kernel cannot apply, `attend` runs xla; `choose` returns the reason (an explicitly
requested kernel logs it once). Both kernels take self-attention only (`q_slot` None, S == T):
their causal mask is static, while a KV cache's slots are traced. So the sampler's prefill and
its T = 1 decode steps always run xla; their scores are materialised one layer at a time and
never kept for a backward pass. cudnn has no logit soft-capping.

A query with no key to attend (a left-padding position, or an all-padding row) outputs 0 in
every implementation, and its gradient is 0: the rows never carry NaN or a backend's choice.

Packed rows (several examples per row, `data/packing.py`): `key_mask` may instead be int32
segment ids [B, T], 0 at padding and k > 0 for the k-th example of the row; a query then attends
the keys of its own segment only (self-attention, no cache), causal within it. xla builds that
mask, splash takes the ids as its segment ids, cudnn as a [B, 1, T, T] mask. A padding position
(segment 0) has no key and outputs 0.

Shapes: B batch, T queries, S keys, N query heads, K key/value heads (N a multiple of K:
grouped-query attention), G = N / K, H head dim.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rlhf_jax.infra import sharding

IMPLS = ("auto", "xla", "splash", "cudnn")
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # a masked logit: finite, so no inf - inf
_BLOCK = 128  # the splash kernel's minimum block (TPU lanes); lengths are padded to it

_log = logging.getLogger(__name__)
_warned: set = set()


def attend(
    q,
    k,
    v,
    *,
    q_slot=None,
    key_mask=None,
    impl: str = "auto",
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
):
    """Causal multi-head attention with key padding, on the implementation `impl` picks.

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, S, K, H] keys and values (K divides N).
      q_slot: the key slot each query sits at, [T] or [B, T] int; a query attends keys with
        slot <= its own. None: the queries are the last T keys (self-attention when S == T).
      key_mask: [B, S] bool, False at padding; None: every key is real. Or int32 segment ids
        [B, T] of packed rows (self-attention only): 0 at padding, and a query attends only the
        keys of its own segment.
      impl: one of IMPLS (module docstring).
      window: sliding window: a query attends keys with slot in (q_slot - window, q_slot].
      softcap: logits become softcap * tanh(logits / softcap) (Gemma 2) before masking.
      scale: the logit scale; default 1 / sqrt(H).

    Returns:
      [B, T, N, H] in q's dtype; 0 at queries with no key to attend.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if is_segments(key_mask) and (q_slot is not None or q.shape[1] != k.shape[1]):
        raise ValueError(
            "segment ids (packed rows) take self-attention only: no KV cache, T == S "
            f"(got {q.shape[1]} queries over {k.shape[1]} keys)"
        )
    chosen, why = choose(impl, q, k, q_slot=q_slot, key_mask=key_mask, softcap=softcap)
    if why and impl != "auto" and (impl, why) not in _warned:
        _warned.add((impl, why))
        _log.warning("attention=%s falls back to xla: %s", impl, why)
    if chosen == "splash":
        return _splash(q, k, v, key_mask, window, softcap, scale)
    if chosen == "cudnn":
        return _cudnn(q, k, v, key_mask, window, scale)
    return xla(
        q, k, v, q_slot=q_slot, key_mask=key_mask, window=window, softcap=softcap, scale=scale
    )


def is_segments(key_mask) -> bool:
    """Whether `key_mask` holds packed rows' segment ids (integers) rather than a bool mask."""
    return key_mask is not None and jnp.issubdtype(key_mask.dtype, jnp.integer)


def _pairs(key_mask):
    """[B, T, S] bool from segment ids [B, T]: query t and key s are in one segment, not
    padding (the causal and window masks are applied beside it)."""
    return (key_mask[:, :, None] == key_mask[:, None, :]) & (key_mask[:, None, :] > 0)


def choose(impl: str, q, k, *, q_slot=None, key_mask=None, softcap=None) -> tuple[str, str]:
    """(the implementation `attend` runs, why the requested kernel does not apply or "")."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation: {impl!r}; expected one of {IMPLS}")
    platform = _platform()
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
        if impl == "xla":
            return "xla", ""
    if impl == "xla":
        return "xla", ""
    t, s = q.shape[1], k.shape[1]
    why = ""
    if q_slot is not None:
        why = "the queries come with cache slots (a KV-cache prefill or decode step)"
    elif t != s:
        why = f"{t} queries over {s} keys (the kernels take self-attention, T == S)"
    elif impl == "cudnn":
        h = q.shape[-1]
        if platform != "gpu":
            why = f"cuDNN needs a CUDA GPU, not {platform}"
        elif q.dtype not in (jnp.bfloat16, jnp.float16):
            why = f"cuDNN takes bfloat16 or float16, not {q.dtype}"
        elif h % 8 or h > 128:
            why = f"cuDNN takes a head dim that is a multiple of 8 and at most 128, not {h}"
        elif softcap is not None:
            why = "jax.nn.dot_product_attention has no logit soft-capping"
        elif key_mask is not None and t % 2:
            why = f"cuDNN takes a mask (bias) only at even lengths, not {t}"
    return ("xla", why) if why else (impl, "")


def _platform() -> str:
    """Where the computation runs: the active mesh's devices (a TPU topology compiled from a
    CPU host is "tpu"), else the default backend."""
    active = sharding.active()
    if active is not None:
        return active[0].devices.flat[0].platform
    return jax.default_backend()


def _slots(q_slot, t: int, s: int):
    """The key slot of each query: [1, T] or [B, T] int32."""
    if q_slot is None:
        return (s - t + jnp.arange(t, dtype=jnp.int32))[None]
    q_slot = jnp.asarray(q_slot, jnp.int32)
    return q_slot[None] if q_slot.ndim == 1 else q_slot


def xla(q, k, v, *, q_slot=None, key_mask=None, window=None, softcap=None, scale=None):
    """The reference: the mask built explicitly, logits and softmax in float32 (`attend`'s args)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    slot = _slots(q_slot, t, s)[..., None]  # [1|B, T, 1]
    keys = jnp.arange(s, dtype=jnp.int32)  # [S]
    mask = keys <= slot  # [1|B, T, S]
    if window is not None:
        mask = mask & (keys > slot - window)
    if is_segments(key_mask):
        mask = mask & _pairs(key_mask)
    elif key_mask is not None:
        mask = mask & key_mask[:, None, :]
    qg = q.reshape(b, t, kh, n // kh, h)  # query heads grouped by their key/value head
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale  # [B, K, G, T, S] float32
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)
    return _zero_empty_rows(y, jnp.any(mask, axis=-1))


def _zero_empty_rows(y, has_key):
    """y [B, T, N, H] with 0 where has_key [1|B, T] is False (no key to attend)."""
    return jnp.where(has_key[:, :, None, None], y, jnp.zeros((), y.dtype))


def _has_key(key_mask, t: int, window):
    """[B|1, T] bool: self-attention query t has a real key in (t - window, t]."""
    if key_mask is None:
        return jnp.ones((1, t), bool)
    if is_segments(key_mask):  # a packed position attends at least itself; padding nothing
        return key_mask > 0
    seen = jnp.cumsum(key_mask.astype(jnp.int32), axis=1)  # [B, T] real keys at slots <= t
    if window is None or window >= t:
        return seen > 0
    before = jnp.pad(seen[:, :-window], ((0, 0), (window, 0)))  # real keys at slots <= t - w
    return seen > before


def _cudnn(q, k, v, key_mask, window, scale):
    t = q.shape[1]
    mask = None
    if is_segments(key_mask):
        mask = _pairs(key_mask)[:, None]
    elif key_mask is not None:
        mask = jnp.broadcast_to(key_mask[:, None, None, :], (q.shape[0], 1, t, t))
    y = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )
    return _zero_empty_rows(y, _has_key(key_mask, t, window))


def _block(length: int) -> int:
    return next(b for b in (512, 256, _BLOCK) if length % b == 0)


def _kernel(heads: int, length: int, window, softcap, interpret: bool):
    """The splash kernel for `heads` query heads over `length` (a multiple of 128) slots.

    Built per call, outside any `shard_map`: its block-mask tables become constants of the
    program (caching the object across traces would leak a trace's arrays into the next)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    if window is None:
        one = sa.CausalMask(shape)
    else:
        one = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    bq = _block(length)
    blocks = sa.BlockSizes(
        block_q=bq,
        block_kv=bq,
        block_kv_compute=bq,
        block_q_dkv=bq,
        block_kv_dkv=bq,
        block_kv_dkv_compute=bq,
        block_q_dq=bq,
        block_kv_dq=bq,
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([one] * heads),
        block_sizes=blocks,
        attn_logits_soft_cap=softcap,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _splash(q, k, v, key_mask, window, softcap, scale):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, h = q.shape
    kh = k.shape[2]
    length = _BLOCK * math.ceil(t / _BLOCK)
    interpret = _platform() != "tpu"
    pad = ((0, 0), (0, length - t), (0, 0), (0, 0))
    # [B, T, N, H] -> [B, N, T', H] with T' the padded length. Padded keys sit after every
    # real query, so the causal mask alone keeps them out; padded queries are sliced off.
    to_heads = lambda x: jnp.pad(x, pad).transpose(0, 2, 1, 3)
    scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel does not scale
    args = [to_heads(x) for x in (scaled, k, v)]
    if is_segments(key_mask):  # packed rows: queries by segment, padding keys -1 (no match)
        seg = key_mask.astype(jnp.int32)
        q_ids, kv_ids = seg, jnp.where(seg > 0, seg, -1)
    elif key_mask is not None:  # real keys 1, padding 0; every query 1
        kv_ids = key_mask.astype(jnp.int32)
        q_ids = jnp.ones_like(kv_ids)
    if key_mask is not None:  # [B, T'] each; the slots past T match nothing real
        extra = ((0, 0), (0, length - t))
        args += [jnp.pad(q_ids, extra), jnp.pad(kv_ids, extra, constant_values=-1)]

    active = sharding.active()
    mesh = active[0] if active is not None and active[0].devices.size > 1 else None
    batch = heads = None
    splits = 1
    if mesh is not None:
        rules = active[1]
        batch = sharding.logical_to_spec(("act_batch",), rules, mesh, (b,))[0]
        heads = sharding.logical_to_spec(("act_heads",), rules, mesh, (n,))[0]
        names = () if heads is None else (heads,) if isinstance(heads, str) else heads
        splits = math.prod(mesh.shape[a] for a in names)
        if kh % splits:  # K does not split like N: every shard keeps all heads
            heads, splits = None, 1
    kernel = _kernel(n // splits, length, window, softcap, interpret)

    def one(q1, k1, v1, q_ids=None, kv_ids=None):  # one row: [n, T', H], [k, T', H], [T']
        ids = None if q_ids is None else sa.SegmentIds(q=q_ids, kv=kv_ids)
        return kernel(q1, k1, v1, segment_ids=ids)

    run = jax.vmap(one)
    if mesh is not None:
        x_spec = PartitionSpec(batch, heads, None, None)
        specs = (x_spec,) * 3 + (PartitionSpec(batch, None),) * (len(args) - 3)
        run = jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=x_spec, check_vma=False)
    y = run(*args)  # [B, N, T', H]
    y = y.transpose(0, 2, 1, 3)[:, :t]
    return _zero_empty_rows(y, _has_key(key_mask, t, window))
