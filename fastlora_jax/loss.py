"""Causal-LM cross-entropy that never materialises float32 logits for the whole batch.

`chunked_cross_entropy` runs the output head and the softmax cross-entropy over chunks of tokens under
`jax.lax.scan`, so at most one [chunk, V] block of logits exists at a time. Its gradient is fused into the forward
pass (a `jax.custom_vjp`, as Liger's fused linear cross-entropy): the chunk's logits are used once for the loss and
the softmax gradient, so the backward pass never recomputes the head matmul. Gradients w.r.t. the head are only
computed when the head is differentiated (a `modules_to_save` copy); a frozen head costs two matmuls, not four.

`causal_lm_loss` follows transformers' `ForCausalLMLoss`: labels [B, T] aligned with input_ids, position t predicts
labels[t + 1], label -100 is ignored; it returns (loss_sum, n_tokens) and the mean is loss_sum / n_tokens.
Axis letters: B batch, T tokens, N flattened tokens, n chunks, C tokens per chunk, D hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.variables import read

IGNORE_INDEX = -100
HEAD_LAYOUTS = ("dv", "vd")  # lm_head weight [D, V]; tied embedding [V, D]
DEFAULT_CHUNK_SIZE = 1024  # [1024, 128256] float32 logits: 0.5 GiB per chunk


def shift_labels(labels: jax.Array, segment_ids: jax.Array | None = None,
                 ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Targets [B, T]: position t predicts labels[t + 1]; the last position, and (packing) the last token of each
    segment, predict nothing (`ignore_index`)."""
    pad = jnp.full((labels.shape[0], 1), ignore_index, labels.dtype)
    targets = jnp.concatenate([labels[:, 1:], pad], axis=1)  # [B, T]
    if segment_ids is not None:
        same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                                jnp.zeros((labels.shape[0], 1), bool)], axis=1)  # [B, T]
        targets = jnp.where(same, targets, ignore_index)
    return targets


def causal_lm_loss(model, input_ids: jax.Array, labels: jax.Array, *, attention_mask: jax.Array | None = None,
                   segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                   dropout_rng: jax.Array | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   ignore_index: int = IGNORE_INDEX, segment_offsets: jax.Array | None = None,
                   segment_lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(loss_sum f32 [], n_tokens i32 []) of a fastlora_jax Llama on input_ids [B, T] and labels [B, T].

    Labels are shifted inside (transformers' semantics); with `segment_ids` (packed rows) the last token of a
    segment does not predict the next segment's first token, and positions restart per segment. segment_offsets /
    segment_lengths: their ragged layout for cuDNN (`fastlora_jax.packed_attention`; speed only).
    """
    hidden, _ = model.model(input_ids, attention_mask=attention_mask, positions=positions,
                            segment_ids=segment_ids, dropout_rng=dropout_rng, segment_offsets=segment_offsets,
                            segment_lengths=segment_lengths)  # [B, T, D]
    head, layout, bias = output_head(model, hidden.dtype)
    targets = shift_labels(labels, segment_ids, ignore_index)  # [B, T]
    return chunked_cross_entropy(hidden, head, targets, bias=bias, head_layout=layout, chunk_size=chunk_size,
                                 ignore_index=ignore_index, mesh=model.model.mesh)


def output_head(model, dtype) -> tuple[jax.Array, str, jax.Array | None]:
    """(weight, layout, bias) of the model's output head in `dtype`: lm_head [D, V] ("dv") or the tied
    embedding [V, D] ("vd"), each the weight its module's forward multiplies by (under modules_to_save, the trained
    copy). A head wrapped in LoRA is folded to a dense weight (the gradient still reaches A, B)."""
    lm_head = model.lm_head
    if lm_head is None:
        return model.model.embed_tokens.dense_weight().astype(dtype), "vd", None
    bias = read(getattr(lm_head, "bias", None), jnp.float32)
    if hasattr(lm_head, "delta_weight"):  # LoraLinear around the head
        base = lm_head.base
        weight = base.dense_weight().astype(jnp.float32) + lm_head.delta_weight()
        return weight.astype(dtype), "dv", read(getattr(base, "bias", None), jnp.float32)
    return lm_head.dense_weight().astype(dtype), "dv", bias


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, labels: jax.Array, *, bias: jax.Array | None = None,
                          head_layout: str = "dv", chunk_size: int = DEFAULT_CHUNK_SIZE,
                          ignore_index: int = IGNORE_INDEX, mesh=None) -> tuple[jax.Array, jax.Array]:
    """(loss_sum f32 [], n_tokens i32 []) of softmax cross-entropy of `hidden @ head` against `labels`.

    hidden [N, D] with labels [N], or [B, T, D] with labels [B, T]; head [D, V] (head_layout="dv") or [V, D]
    ("vd"); labels are already the targets of each row (no shift here), `ignore_index` ignored; bias [V] or None.
    Logits exist one chunk of at most `chunk_size` tokens at a time, computed with float32 accumulation. A [B, T]
    batch is chunked along T (each chunk [B, chunk_size // B] tokens), so a batch sharded over devices stays
    sharded in every chunk; `mesh` (a jax.sharding.Mesh, or None) pins that sharding. Without a mesh, B >
    chunk_size rows are chunked as flat tokens; with one, each chunk then holds one token of every row.
    """
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout={head_layout!r}; accepted: {', '.join(HEAD_LAYOUTS)}")
    if hidden.ndim not in (2, 3) or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"hidden must be [N, D] with labels [N], or [B, T, D] with labels [B, T]; got "
                         f"{hidden.shape=} {labels.shape=}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if hidden.ndim == 2 or (hidden.shape[0] > chunk_size and mesh is None):  # rows wider than a chunk: flat tokens
        hidden, labels = hidden.reshape(1, -1, hidden.shape[-1]), labels.reshape(1, -1)
    B, T, D = hidden.shape
    valid = labels != ignore_index
    n_tokens = jnp.sum(valid, dtype=jnp.int32)
    chunk = min(max(1, chunk_size // B), T)  # tokens of each row per chunk
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    safe = jnp.where(valid, labels, -1).astype(jnp.int32)  # -1: ignored (matches no vocab index)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        safe = jnp.pad(safe, ((0, 0), (0, pad)), constant_values=-1)
    h = hidden.reshape(B, n_chunks, chunk, D).transpose(1, 0, 2, 3).reshape(n_chunks, B * chunk, D)  # [n, C, D]
    lab = safe.reshape(B, n_chunks, chunk).transpose(1, 0, 2).reshape(n_chunks, B * chunk)  # [n, C]
    if mesh is not None:  # C is row-major over (B, chunk): its B part keeps the batch's devices
        from fastlora_jax.sharding import chunk_sharding

        h, lab = (jax.lax.with_sharding_constraint(a, chunk_sharding(mesh, a.ndim)) for a in (h, lab))
    bias = jnp.zeros((0,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    loss_sum = _fused_ce(h, head, bias, lab, head_layout)
    return loss_sum, n_tokens


def cross_entropy_reference(hidden: jax.Array, head: jax.Array, labels: jax.Array, *,
                            bias: jax.Array | None = None, head_layout: str = "dv",
                            ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
    """Unchunked reference of `chunked_cross_entropy`: the whole [N, V] float32 logits at once."""
    logits = _logits(hidden, head, head_layout)  # [N, V] f32
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[:, None], -1)[:, 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------- implementation


def _logits(h: jax.Array, head: jax.Array, layout: str) -> jax.Array:  # h [C, D] -> [C, V] f32
    spec = "cd,dv->cv" if layout == "dv" else "cd,vd->cv"
    return jnp.einsum(spec, h, head.astype(h.dtype), preferred_element_type=jnp.float32)


def _chunk_nll(h, head, bias, lab, layout):
    """Per-chunk (sum of nll, float32 logits [C, V], logsumexp [C]); lab -1 marks ignored rows."""
    logits = _logits(h, head, layout)
    if bias.shape[0]:
        logits = logits + bias
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    target = jnp.take_along_axis(logits, jnp.maximum(lab, 0)[:, None], axis=-1)[:, 0]
    nll = jnp.where(lab >= 0, lse - target, 0.0)
    return jnp.sum(nll), logits, lse


def _ce_primal(h, head, bias, lab, layout):
    def body(total, xs):
        s, _, _ = _chunk_nll(*xs[:1], head, bias, xs[1], layout)
        return total + s, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, lab))
    return total


def _ce_fwd(h, head, bias, lab, layout):
    """Loss plus the gradients w.r.t. hidden (and head / bias when differentiated), chunk by chunk."""
    want_head, want_bias = head.perturbed, bias.perturbed
    h, head, bias, lab = h.value, head.value, bias.value, lab.value
    V = head.shape[1] if layout == "dv" else head.shape[0]

    def body(carry, xs):
        total, d_head, d_bias = carry
        hc, lc = xs  # [C, D], [C]
        s, logits, lse = _chunk_nll(hc, head, bias, lc, layout)
        onehot = jnp.arange(V, dtype=jnp.int32)[None, :] == lc[:, None]  # [C, V]; lc = -1 matches nothing
        d_logits = jnp.where(lc[:, None] >= 0, jnp.exp(logits - lse[:, None]) - onehot, 0.0)  # [C, V] f32
        d_lo = d_logits.astype(hc.dtype)
        spec = "cv,dv->cd" if layout == "dv" else "cv,vd->cd"
        d_h = jnp.einsum(spec, d_lo, head.astype(hc.dtype), preferred_element_type=jnp.float32).astype(hc.dtype)
        if want_head:
            spec = "cd,cv->dv" if layout == "dv" else "cd,cv->vd"
            d_head = d_head + jnp.einsum(spec, hc, d_lo, preferred_element_type=jnp.float32)
        if want_bias:
            d_bias = d_bias + jnp.sum(d_logits, axis=0)
        return (total + s, d_head, d_bias), d_h

    init = (jnp.zeros((), jnp.float32),
            jnp.zeros(head.shape, jnp.float32) if want_head else None,
            jnp.zeros(bias.shape, jnp.float32) if want_bias else None)
    (total, d_head, d_bias), d_h = jax.lax.scan(body, init, (h, lab))  # d_h [n, C, D]
    d_head = None if d_head is None else d_head.astype(head.dtype)
    d_bias = None if d_bias is None else d_bias.astype(bias.dtype)
    return total, (d_h, d_head, d_bias)


def _ce_bwd(layout, res, g):
    d_h, d_head, d_bias = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros((), jnp.float32)

    def scale(x):
        return None if x is None else (x.astype(jnp.float32) * g).astype(x.dtype)

    return scale(d_h), scale(d_head), scale(d_bias), None


_fused_ce = jax.custom_vjp(_ce_primal, nondiff_argnums=(4,))
_fused_ce.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)
