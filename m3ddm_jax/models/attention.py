"""The one attention function of the project.

Every attention in the U-Net (spatial self-attention, cross-attention to the global tokens, temporal
attention) and in the VAE (mid-block self-attention) goes through :func:`attention`.

Layout: ``q`` is ``(B, Lq, H*D)``, ``k`` and ``v`` are ``(B, Lk, H*D)`` (channels-last tokens); the result
is ``(B, Lq, H*D)``. Scores are ``q.k^T * D**-0.5`` with a softmax over keys and no mask, as in the
reference.

Implementations (``impl``):

* ``"xla"`` (default): einsum + softmax, written so that XLA fuses the scale and the softmax. With
  ``query_chunk`` set, queries are processed ``query_chunk`` at a time under ``lax.map`` so that the full
  ``(B, H, Lq, Lk)`` score tensor never exists at once (peak memory ``B*H*query_chunk*Lk``); the result is
  the same math.
* ``"dot_product"``: :func:`jax.nn.dot_product_attention` with XLA's own lowering.
* ``"cudnn"``: :func:`jax.nn.dot_product_attention` forced to cuDNN's fused (flash) kernel; GPU only,
  fp16/bf16 inputs.
* ``"flash"``: on TPU, the Pallas TPU flash-attention kernel (scores live in VMEM tiles only, never in HBM)
  wherever its tiling applies: head width at most 128 or a multiple of 128, and at least 128 queries and
  keys (shorter ones gain nothing); lengths are padded to whole blocks, padded keys masked by segment ids
  and padded queries dropped. Everywhere else (other platforms: chosen at lowering time by
  ``lax.platform_dependent``, so a TPU compile on a CPU host takes the kernel; shapes the kernel does not
  tile, e.g. the 16-token temporal attention) the ``"xla"`` path with query chunking (``query_chunk``, or a
  ``FLASH_FALLBACK_BUDGET_MIB`` score budget when none is given).

The softmax is computed in float32 whatever the input dtype (the reference keeps fp16 there; an fp32
softmax is the better choice for bf16 compute and identical for fp32).
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "dot_product", "cudnn", "flash"]
IMPLEMENTATIONS = ("xla", "dot_product", "cudnn", "flash")
FLASH_FALLBACK_BUDGET_MIB = 128.0
_LANES = 128


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    b, n, c = x.shape
    if c % heads:
        raise ValueError(f"attention: channel width {c} is not divisible by {heads} heads")
    return x.reshape(b, n, heads, c // heads)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    # softmax with the normalisation moved after the value product: one pass less over the score tensor
    # (the same maths; about 2x faster attention on CPU)
    p = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    denom = jnp.sum(p, axis=-1)  # (B, H, Lq)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.transpose(denom, (0, 2, 1))[..., None]).astype(v.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    *,
    impl: AttentionImpl = "xla",
    query_chunk: int | None = None,
) -> jax.Array:
    """Multi-head scaled dot-product attention, ``(B, Lq, H*D) x (B, Lk, H*D) -> (B, Lq, H*D)``."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention: unknown implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    b, lq, c = q.shape
    qh, kh, vh = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)

    if impl in ("dot_product", "cudnn"):
        out = jax.nn.dot_product_attention(
            qh, kh, vh, implementation="cudnn" if impl == "cudnn" else "xla"
        )
        return out.reshape(b, lq, c)

    if impl == "flash":
        fallback = lambda q_, k_, v_: _chunked_xla(q_, k_, v_, query_chunk or _fallback_chunk(q_, k_))  # noqa: E731
        if not flash_applies(lq, k.shape[1], c // heads):
            return fallback(qh, kh, vh).reshape(b, lq, c)
        out = jax.lax.platform_dependent(qh, kh, vh, tpu=_flash_tpu, default=fallback)
        return out.reshape(b, lq, c)

    return _chunked_xla(qh, kh, vh, query_chunk).reshape(b, lq, c)


def flash_applies(lq: int, lk: int, head_dim: int) -> bool:
    """Whether the Pallas TPU kernel takes these shapes (see the module docstring)."""
    return lq >= _LANES and lk >= _LANES and (head_dim <= _LANES or head_dim % _LANES == 0)


def _fallback_chunk(q: jax.Array, k: jax.Array) -> int | None:
    b, lq, h, _ = q.shape
    rows = int(FLASH_FALLBACK_BUDGET_MIB * 2**20) // max(b * h * k.shape[1] * 4, 1)
    return None if rows >= lq else max(1 << (max(rows, 1).bit_length() - 1), 8)


def _block(n: int) -> tuple[int, int]:
    """``(block, padded length)``: 512-long blocks for long sequences, else one block of whole lanes."""
    if n >= 512:
        return 512, -(-n // 512) * 512
    padded = -(-n // _LANES) * _LANES
    return padded, padded


def _flash_tpu(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Pallas TPU flash attention; q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # noqa: PLC0415

    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, lq_p = _block(lq)
    bk, lk_p = _block(lk)
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, H, L, D)
    if lq_p != lq:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, lq_p - lq), (0, 0)))
    segment_ids = None
    if lk_p != lk:
        kt = jnp.pad(kt, ((0, 0), (0, 0), (0, lk_p - lk), (0, 0)))
        vt = jnp.pad(vt, ((0, 0), (0, 0), (0, lk_p - lk), (0, 0)))
        kv_ids = jnp.broadcast_to((jnp.arange(lk_p) >= lk).astype(jnp.int32), (b, lk_p))  # padding: segment 1
        segment_ids = fa.SegmentIds(q=jnp.zeros((b, lq_p), jnp.int32), kv=kv_ids)
    sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                          block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                          block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    out = fa.flash_attention(qt, kt, vt, segment_ids=segment_ids, sm_scale=1.0 / math.sqrt(d), block_sizes=sizes)
    return jnp.swapaxes(out[:, :, :lq], 1, 2).astype(v.dtype)


def _chunked_xla(qh: jax.Array, kh: jax.Array, vh: jax.Array, query_chunk: int | None) -> jax.Array:
    """The ``"xla"`` path on split heads, queries ``query_chunk`` at a time (``None``: all at once)."""
    b, lq, heads, _ = qh.shape
    if query_chunk is None or lq <= query_chunk:
        return _xla_attention(qh, kh, vh)

    # Chunk the queries: pad Lq to a multiple of the chunk, map over chunks, drop the padding.
    n_chunks = -(-lq // query_chunk)
    pad = n_chunks * query_chunk - lq
    if pad:
        qh = jnp.pad(qh, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qh.reshape(b, n_chunks, query_chunk, heads, -1).swapaxes(0, 1)  # (n, B, chunk, H, D)
    out = jax.lax.map(lambda qi: _xla_attention(qi, kh, vh), qc)
    return out.swapaxes(0, 1).reshape(b, n_chunks * query_chunk, heads, -1)[:, :lq]
