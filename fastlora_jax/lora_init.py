"""LoRA initialisation methods (`init_lora_weights`), as PEFT's `LoraLayer.update_layer` defines them.

Every function works on a stack of layers at once: the base weight is ours, w [*stack, in, out] (HF's W [out, in]
transposed), and the results are ours too: a [*stack, in, r] = HF lora_A.T, b [*stack, r, out] = HF lora_B.T.
- True: A kaiming-uniform with a=sqrt(5) as torch's nn.Linear default on a (r, in) weight, i.e. U(-1/sqrt(in),
  1/sqrt(in)); B zeros (the output is unchanged at init).
- False: both as nn.Linear's default init (PEFT skips its reset): A U(+-1/sqrt(in)), B U(+-1/sqrt(r)).
- "gaussian": A normal with std 1/r, B zeros.
- "pissa": W = V S Uh (full SVD, float32); A = sqrt(S_r / s) Uh_r, B = V_r sqrt(S_r / s) (s = scaling); the base
  becomes W - s B A in its own dtype. "pissa_niter_K": the same from a randomized SVD (torch.svd_lowrank's algorithm,
  q = r, K subspace iterations, Gaussian start drawn from the key).
- "olora": W = Q R (reduced QR, float32); A = R[:r], B = Q[:, :r]; the base becomes W - s B A.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

INIT_METHODS = ("True", "False", "'gaussian'", "'pissa'", "'pissa_niter_K'", "'olora'", "'loftq'")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def validate_init(init) -> bool | str:
    """Returns `init` if it names a supported method, else raises ValueError listing the accepted ones."""
    if init is True or init is False:
        return init
    if isinstance(init, str):
        if init.lower() in ("gaussian", "olora"):
            return init.lower()
        if init in ("pissa", "loftq") or _PISSA_NITER.fullmatch(init):
            return init
    raise ValueError(f"init_lora_weights={init!r} is not supported; accepted: {', '.join(INIT_METHODS)}")


def needs_base_weight(init) -> bool:
    """True for the methods that read the base weight and replace it by a residual (pissa*, olora)."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def init_random(init, key: jax.Array, stack: tuple[int, ...], in_features: int, out_features: int,
                r: int) -> tuple[jax.Array, jax.Array]:
    """(a [*stack, in, r], b [*stack, r, out]) float32 for init True / False / "gaussian"."""
    key_a, key_b = jax.random.split(key)
    a_shape, b_shape = (*stack, in_features, r), (*stack, r, out_features)
    if init == "gaussian":
        a = jax.random.normal(key_a, a_shape, jnp.float32) / r
    else:  # kaiming_uniform_(a=sqrt(5)) on a (r, in) weight: bound = gain * sqrt(3 / fan_in) = 1 / sqrt(in)
        a = _uniform(key_a, a_shape, 1.0 / math.sqrt(in_features))
    if init is False:  # nn.Linear(r, out) default init of lora_B: bound 1 / sqrt(r)
        b = _uniform(key_b, b_shape, 1.0 / math.sqrt(r))
    else:
        b = jnp.zeros(b_shape, jnp.float32)
    return a, b


def init_from_weight(init: str, key: jax.Array, w: jax.Array, r: int,
                     scaling: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA / OLoRA from the base weight w [*stack, in, out]: (a [*stack, in, r], b [*stack, r, out] float32,
    residual [*stack, in, out] in w.dtype = w - scaling * a @ b, as PEFT writes it back into the base layer)."""
    in_features, out_features = w.shape[-2:]
    if r > min(in_features, out_features):
        raise ValueError(f"init_lora_weights={init!r} needs r <= min(in, out) = {min(in_features, out_features)}; "
                         f"got r={r}")
    weight = jnp.swapaxes(w.astype(jnp.float32), -1, -2)  # HF layout W [*stack, out, in]
    if init == "olora":
        q, rr = jnp.linalg.qr(weight)  # [*stack, out, k], [*stack, k, in]
        lora_b, lora_a = q[..., :, :r], rr[..., :r, :]  # B [*stack, out, r], A [*stack, r, in]
    else:
        if init == "pissa":
            v, s, uh = jnp.linalg.svd(weight, full_matrices=False)  # [*stack, out, k], [*stack, k], [*stack, k, in]
            v, s, uh = v[..., :, :r], s[..., :r], uh[..., :r, :]
        else:
            niter = int(_PISSA_NITER.fullmatch(init).group(1))
            v, s, uh = _svd_lowrank(weight, r, niter, key)
        root = jnp.sqrt(s / scaling)  # [*stack, r]
        lora_a = root[..., :, None] * uh  # diag(sqrt(S_r)) @ Uh_r  [*stack, r, in]
        lora_b = v * root[..., None, :]  # V_r @ diag(sqrt(S_r))  [*stack, out, r]
    residual = weight - scaling * jnp.einsum("...or,...ri->...oi", lora_b, lora_a)  # [*stack, out, in]
    a = jnp.swapaxes(lora_a, -1, -2)
    b = jnp.swapaxes(lora_b, -1, -2)
    return a, b, jnp.swapaxes(residual, -1, -2).astype(w.dtype)


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, minval=-bound, maxval=bound)


def _svd_lowrank(m: jax.Array, q: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """torch.svd_lowrank(m, q, niter) (Halko et al. 2009, Algorithm 4.4) for m [*stack, rows, cols] float32:
    (U [*stack, rows, q], S [*stack, q], Vh [*stack, q, cols])."""
    mh = jnp.swapaxes(m, -1, -2)
    start = jax.random.normal(key, (*m.shape[:-2], m.shape[-1], q), jnp.float32)  # [*stack, cols, q]
    basis = jnp.linalg.qr(m @ start)[0]  # [*stack, rows, q]
    for _ in range(niter):
        basis = jnp.linalg.qr(mh @ basis)[0]
        basis = jnp.linalg.qr(m @ basis)[0]
    projected = jnp.swapaxes(basis, -1, -2) @ m  # [*stack, q, cols]
    u, s, vh = jnp.linalg.svd(projected, full_matrices=False)
    return basis @ u, s, vh
