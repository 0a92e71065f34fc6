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
- "olora": W = Q R (reduced QR, float32); A = R[:r], B = Q[:, :r]; the base becomes W - s B A. Over an NF4
  base, as PEFT: dequantize, compute, quantize the residual again (pissa raises TypeError there, as PEFT).
- "loftq": PEFT's `loftq_init` (4-bit): num_iter rounds of res -> NF4 (bitsandbytes-exact codes, float32 absmax,
  compress_statistics=False) -> rank-r SVD of W - dequant; A = sqrt(S_r) Vh_r, B = U_r sqrt(S_r) (scaling ignored,
  as PEFT); the 16-bit base keeps the dequantized NF4 weight. Needs the full-precision base, as PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax import nf4
from fastlora_jax.linear import Linear

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
    """True for the methods that read the base weight and replace it (pissa*, olora, loftq)."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "loftq"))


def validate_loftq_config(config) -> dict:
    """PEFT's loftq_config (a dict or a peft.LoftQConfig) as a dict {"loftq_bits": 4, "loftq_iter": n}."""
    if config is not None and not isinstance(config, dict):
        config = dict(vars(config))
    if not config:
        raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}, "
                         "as PEFT")
    unknown = sorted(set(config) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise ValueError(f"loftq_config keys {unknown} are unknown; accepted: loftq_bits, loftq_iter")
    bits, iters = config.get("loftq_bits", 4), config.get("loftq_iter", 1)
    if bits != 4:
        raise NotImplementedError(f"loftq_config loftq_bits={bits!r}; accepted: 4 (NF4)")
    if not isinstance(iters, int) or iters <= 0:
        raise ValueError(f"loftq_config loftq_iter={iters!r}; accepted: an int > 0")
    return {"loftq_bits": bits, "loftq_iter": iters}


def init_with_base(init: str, key: jax.Array, base, r: int, scaling: float, mask: jax.Array | None,
                   loftq_config: dict) -> tuple[object, jax.Array, jax.Array]:
    """pissa* / olora / loftq on a (stacked) base layer: (the new base layer, a, b). Layers where `mask` [L] is
    False keep their base weight, with a and b zero (the caller zeroes them)."""
    if isinstance(base, Linear):
        w = base.weight[...]  # [*stack, in, out]
        if init == "loftq":
            a, b, new_w = init_loftq(w, r, num_iter=loftq_config["loftq_iter"])
        else:
            a, b, new_w = init_from_weight(init, key, w, r, scaling)
        if mask is not None:
            new_w = jnp.where(mask[:, None, None], new_w, w)
        base.weight.set_value(new_w)
        return base, a, b
    if isinstance(base, nf4.NF4Linear):
        if init == "loftq":
            raise ValueError("init_lora_weights='loftq' needs the full-precision weights, as PEFT's LoftQ (which "
                             "replaces them by their NF4 dequantization, also when it loads a LoftQ adapter): load the "
                             "model without load_in_4bit")
        if init != "olora":
            raise TypeError(f"init_lora_weights={init!r} over an NF4 base: initialize PiSSA under float32, float16 "
                            "or bfloat16 (load without load_in_4bit), as PEFT")
        dense = base.dense_weight()  # [*stack, in, out] in the dequantized dtype
        a, b, residual = init_from_weight(init, key, dense.astype(jnp.float32), r, scaling)
        return _requantized(base, residual, mask), a, b
    raise NotImplementedError(f"init_lora_weights={init!r} over a {type(base).__name__} base is not supported")


def _requantized(base, residual: jax.Array, mask: jax.Array | None):
    """A new NF4Linear: the residual [*stack, in, out] quantized where `mask` is True, the old codes elsewhere."""
    old = base.nf4()
    residual = np.asarray(residual)
    if mask is None:
        weights = _quantize_as(residual, base.dtype)
    else:
        keep = np.asarray(mask)
        weights = nf4.stack_nf4([_quantize_as(residual[i], base.dtype) if keep[i] else old[i]
                                 for i in range(keep.shape[0])])
    bias = None if base.bias is None else base.bias[...]
    return nf4.NF4Linear.from_nf4(weights, bias, implementation=base.implementation, rounding=base.rounding)


def _quantize_as(w_in_out: np.ndarray, dtype) -> nf4.NF4Array:
    """NF4 of a float32 [in, out] weight (HF layout [out, in] inside), dequantizing to `dtype`."""
    return dataclasses.replace(nf4.quantize_nf4(w_in_out.T), dtype=dtype)


def init_loftq(w: jax.Array, r: int, *, num_iter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PEFT's 4-bit `loftq_init` on every layer of w [*stack, in, out]: (a [*stack, in, r], b [*stack, r, out]
    float32, the dequantized NF4 weight [*stack, in, out] in w.dtype)."""
    stack, (fan_in, fan_out) = w.shape[:-2], w.shape[-2:]
    flat = np.asarray(w.astype(jnp.float32)).reshape(-1, fan_in, fan_out)
    a_all, b_all, q_all = [], [], []
    for layer in flat:
        weight = layer.T  # [out, in]
        residual = weight
        for i in range(num_iter):
            dequantized = nf4_roundtrip(residual)
            lora_b, lora_a = _low_rank(weight - dequantized, r)  # [out, r], [r, in]
            if i + 1 == num_iter:
                break
            residual = weight - lora_b @ lora_a
        a_all.append(lora_a.T)
        b_all.append(lora_b.T)
        q_all.append(dequantized.T)
    shape = lambda x: jnp.asarray(np.stack(x)).reshape(*stack, *x[0].shape)  # noqa: E731
    return shape(a_all), shape(b_all), shape(q_all).astype(w.dtype)


def nf4_roundtrip(x: np.ndarray) -> np.ndarray:
    """bitsandbytes `dequantize_4bit(quantize_4bit(x, "nf4", compress_statistics=False, blocksize=64))` of a
    float32 [out, in] array: the NF4 value of each element times its block's float32 absmax."""
    n = x.size
    packed = nf4.quantize_nf4(x).packed
    codes = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]
    nblocks = -(-n // nf4.BLOCKSIZE)
    blocks = np.zeros(nblocks * nf4.BLOCKSIZE, np.float32)
    blocks[:n] = x.reshape(-1)
    absmax = np.abs(blocks.reshape(nblocks, nf4.BLOCKSIZE)).max(axis=1)
    values = nf4.NF4_CODE[codes] * np.repeat(absmax, nf4.BLOCKSIZE)[:n]
    return values.astype(np.float32).reshape(x.shape)


def _low_rank(m: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's `_low_rank_decomposition`: (U_r sqrt(S_r) [rows, r], sqrt(S_r) Vh_r [r, cols]) in float32."""
    u, s, vh = np.linalg.svd(m.astype(np.float32), full_matrices=False)
    root = np.sqrt(s[:r])
    return u[:, :r] * root[None, :], root[:, None] * vh[:r]


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
