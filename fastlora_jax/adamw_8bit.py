"""bitsandbytes' 8-bit blockwise AdamW (`bnb.optim.AdamW8bit`, transformers' optim="adamw_8bit") as an optax
GradientTransformation with bitsandbytes' numbers.

bitsandbytes stores Adam's two moments of every parameter tensor of at least `min_8bit_size` (4096) elements as
uint8 codes: the tensor, flattened row-major, is cut into blocks of 256 values; each block keeps its largest |value|
(float32 absmax) and each value as the index of the entry of a 256-entry dynamic map (`dynamic_map`: signed for the
first moment, unsigned for the second) that represents value / absmax. Smaller tensors keep float32 moments. A step
dequantizes (map[code] * absmax), runs AdamW in float32, and quantizes the new moments under their new absmax.

The step, for step t (1-based), learning rate lr and decay wd (0 where `mask` is False):

    m = b1 * m + (1 - b1) * g            v = b2 * v + (1 - b2) * g * g
    c1 = 1 - b1**t                       c2 = sqrt(1 - b2**t)
    p = p - (lr * c2 / c1) * m / (sqrt(v) + eps * c2)     (= p - lr * m_hat / (sqrt(v_hat) + eps))
    p = p * (1 - lr * wd)                                  (decoupled decay, applied after the step)

`backend` picks which of bitsandbytes' kernels to reproduce:
  "cuda" (default; what bnb runs on NVIDIA GPUs): codes are the nearest map entry (bnb's binary search and its tie
    rule); a first-moment code whose sign differs from the moment's moves one entry towards it; a gradient entry that
    is not finite zeroes both moments there and leaves the parameter unchanged. 32-bit tensors: the formulas above.
    bitsandbytes' CUDA library is built with --use_fast_math, so its c1 and c2 come from an approximate powf; here
    they are exact. On an H100 the codes came out identical and the parameters within 1.3e-6 after five steps at
    lr 1e-2 (tests/test_adamw_8bit.py's GPU test).
  "cpu" (bnb's CPU backend; the tests compare against it): the decay comes first (p * (1 - lr * wd), then the step,
    written p + (-lr / c1) * m / (sqrt(v) / c2 + eps)); codes go through a 65536-entry table of value / absmax rounded
    to 16 bits, so every |value| below about 1.5e-5 * absmax, zero included, takes the code nearest 1.5e-5; a block
    whose absmax is 0 gets code 0.

`tensors` says how bitsandbytes would see each leaf (`BnbTensor`): leading axes that stack separate torch tensors
(decoder layers), whether each is stored transposed from torch's layout, and 32-bit overrides (transformers keeps
nn.Embedding weights 32-bit). Blocks and the 4096-element rule apply per torch tensor, in torch's layout; the codes
are stored in the leaf's own shape and layout (so its sharding applies to them) and absmax as [*stack, blocks].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

BLOCK_SIZE = 256  # values per absmax: bitsandbytes' blockwise optimizers always use 256
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: tensors of fewer elements keep float32 moments
BACKENDS = ("cuda", "cpu")
_LUT_SIZE = 65536  # bnb's CPU backend: value / absmax rounded to one of 65536 points of [-1, 1]


@dataclasses.dataclass(frozen=True)
class BnbTensor:
    """How bitsandbytes would see one leaf: `stack_axes` leading axes index separate torch tensors (stacked layers);
    `transpose`: each torch tensor is the transpose of the leaf's last two axes (a Linear weight kept [in, out]);
    `optim_bits=32`: float32 moments whatever the size (transformers' override for nn.Embedding weights)."""

    stack_axes: int = 0
    transpose: bool = False
    optim_bits: int = 8

    def __post_init__(self):
        if self.optim_bits not in (8, 32):
            raise ValueError(f"optim_bits={self.optim_bits!r}; accepted: 8, 32")
        if not isinstance(self.stack_axes, int) or self.stack_axes < 0:
            raise ValueError(f"stack_axes={self.stack_axes!r}; accepted: an int >= 0")


class Blockwise8bit(NamedTuple):
    """One moment of one leaf in 8 bits."""

    codes: jax.Array  # uint8, the leaf's shape: indices into the dynamic map
    absmax: jax.Array  # float32 [*stack, blocks]: the largest |value| of each block of 256 (per torch tensor)


class Adam8bitState(NamedTuple):
    """count: int32 [] updates done; mu / nu: per leaf a `Blockwise8bit`, or float32 [leaf shape] (small tensors)."""

    count: jax.Array
    mu: Any
    nu: Any


def dynamic_map(signed: bool) -> np.ndarray:
    """float32 [256], sorted: bitsandbytes.functional.create_dynamic_map(signed) bit for bit (7 decades of
    'dynamic exponent' values down to 1e-6 scale, 0 and 1; signed: 127 negative, 0, 128 positive entries)."""
    f32, data = np.float32, []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = _torch_linspace(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / f32(2)
        data += list(f32(10.0 ** (i - 6)) * means)
        if signed:
            data += list(f32(-(10.0 ** (i - 6))) * means)
    return np.sort(np.array(data + [0.0, 1.0], np.float32))


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: float32 step, each value one fused multiply-add
    from the nearer end."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64((end - start) / np.float32(steps - 1))
    i = np.arange(steps)
    low = (np.float64(start) + step * i).astype(np.float32)
    high = (np.float64(end) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, low, high)


def _cpu_table(code: np.ndarray) -> np.ndarray:
    """uint8 [65536]: bnb's CPU lookup table, the code nearest each point -1 + 2 i / 65535 (by midpoints)."""
    mids = np.float32(0.5) * (code[:-1] + code[1:])
    points = np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1)
    return np.searchsorted(mids, points, side="left").astype(np.uint8)


# ------------------------------------------------------------------------------------------------ quantization

def _order_key(bits):
    """float32 bit patterns (uint32, numpy or jax) -> keys in the floats' value order (negatives reversed below
    positives)."""
    xp = np if isinstance(bits, np.ndarray) else jnp
    return xp.where(bits >> 31 == 1, ~bits, bits | xp.uint32(0x80000000))


def _bucket_table(mids: np.ndarray) -> np.ndarray:
    """uint8 [65536]: for each bucket of 2^16 consecutive float32 values in value order (the top 16 bits of
    `_order_key`), how many midpoints lie below its first value (infinity for the NaN buckets' starts)."""
    keys = np.arange(_LUT_SIZE, dtype=np.uint32) << np.uint32(16)
    bits = np.where(keys >> 31, keys & np.uint32(0x7FFFFFFF), ~keys)  # the inverse of _order_key
    start = bits.view(np.float32)
    start = np.where(np.isnan(start), np.where(keys >> 31, np.inf, -np.inf), start).astype(np.float32)
    return np.searchsorted(mids, start, side="left").astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _midpoint_lookup(code_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(`_bucket_table` of the map's midpoints, float32 [256] midpoints with NaN after the last: none above it) for
    a sorted float32 map given as bytes; built once per map, not at every trace."""
    code = np.frombuffer(code_bytes, np.float32)
    mids = (code[:-1] + code[1:]) * np.float32(0.5)  # [255], increasing
    table = _bucket_table(mids)
    if np.any(np.diff(table[_order_key(mids.view(np.uint32)) >> 16].astype(np.int32)) == 0):
        raise RuntimeError("two midpoints of the map share a 16-bit bucket: the lookup would miss one")
    return table, np.append(mids, np.float32(np.nan))


def _quantize_nearest(code: np.ndarray, x: jax.Array) -> jax.Array:
    """int32 codes of x (value / absmax) as bnb's CUDA `quantize_2D`: the nearest entry of the sorted map by float32
    midpoints, an exact midpoint to the even index of the two, NaN to 0. (The kernel's 7-step binary search lands on
    an even index p with x between entries p - 1 and p + 1, then takes the nearer of p and the neighbour on x's
    side by their midpoint, keeping p on a tie: that is this rule.)
    Computed as the number of midpoints below x in two lookups: a 65536-entry table by x's top 16 bits in value order
    (each such bucket of floats holds at most one midpoint of either map: checked when the table is built) gives the
    count below the bucket, and one comparison with the next midpoint completes it."""
    table, padded = (jnp.asarray(a) for a in _midpoint_lookup(np.asarray(code, np.float32).tobytes()))
    bucket = (_order_key(jax.lax.bitcast_convert_type(x, jnp.uint32)) >> 16).astype(jnp.int32)
    below = jnp.asarray(table)[bucket].astype(jnp.int32)
    count = below + (x > padded[below])  # midpoints < x
    tie = (x == padded[count]) & (count % 2 == 1)
    return jnp.where(jnp.isnan(x), 0, count + tie)


def _quantize_cuda(code: np.ndarray, s: jax.Array, absmax: jax.Array, signed: bool) -> jax.Array:
    """uint8 codes of s [S, nb, 256] under absmax [S, nb] (bnb's CUDA optimizer kernel)."""
    c = _quantize_nearest(code, s / absmax[..., None])
    if signed:  # the kernel keeps the first moment's sign: a code of the other sign moves one entry towards it
        flipped = jnp.signbit(jnp.asarray(code)[c]) != jnp.signbit(s)
        c = jnp.where(flipped, jnp.where(s > 0, c + 1, c - 1), c)
    return (c % 256).astype(jnp.uint8)  # uint8 arithmetic: 0 - 1 wraps to 255 there


def _quantize_cpu(table: jax.Array, s: jax.Array, absmax: jax.Array) -> jax.Array:
    """uint8 codes of s [S, nb, 256] under absmax [S, nb] (bnb's CPU quantize_blockwise: 16-bit table lookup)."""
    x = jnp.clip(s * (1.0 / absmax)[..., None], -1.0, 1.0)
    index = (((x + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).astype(jnp.uint16)
    return jnp.where(absmax[..., None] == 0, 0, table[index.astype(jnp.int32)]).astype(jnp.uint8)


# ------------------------------------------------------------------------------------------------ layouts

def _torch_tensors(x: jax.Array, t: BnbTensor, fill) -> jax.Array:
    """[*stack, *rest] -> [S, blocks, 256]: each stacked torch tensor flattened row-major in torch's layout,
    the last block padded with `fill`."""
    x = x.reshape(-1, *x.shape[t.stack_axes:])
    if t.transpose:
        x = jnp.swapaxes(x, -1, -2)
    x = x.reshape(x.shape[0], -1)
    x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % BLOCK_SIZE)), constant_values=fill)
    return x.reshape(x.shape[0], -1, BLOCK_SIZE)


def _leaf_layout(y: jax.Array, t: BnbTensor, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of `_torch_tensors`: [S, blocks, 256] -> the leaf's `shape`."""
    rest = shape[t.stack_axes:]
    torch_rest = (*rest[:-2], rest[-1], rest[-2]) if t.transpose else rest
    y = y.reshape(y.shape[0], -1)[:, :math.prod(rest)].reshape(-1, *torch_rest)
    if t.transpose:
        y = jnp.swapaxes(y, -1, -2)
    return y.reshape(shape)


def _zero_8bit(leaf: jax.Array, t: BnbTensor) -> Blockwise8bit:
    """bnb's initial 8-bit moment: code 0 under absmax 0 (the value 0)."""
    blocks = -(-math.prod(leaf.shape[t.stack_axes:]) // BLOCK_SIZE)
    return Blockwise8bit(jnp.zeros_like(leaf, jnp.uint8), jnp.zeros((*leaf.shape[:t.stack_axes], blocks), jnp.float32))


def _check_layout(t: BnbTensor, shape: tuple[int, ...], where: str) -> None:
    if not isinstance(t, BnbTensor):
        raise TypeError(f"tensors: {where} is {t!r}; accepted: a BnbTensor")
    if t.stack_axes + (2 if t.transpose else 0) > len(shape):
        raise ValueError(f"tensors: {where} of shape {shape} cannot have {t.stack_axes} stacked axes"
                         + (" and a transposed 2-D tensor" if t.transpose else ""))


def _per_leaf(spec, params, treedef, default) -> list:
    """The value of `spec` (None, a pytree prefix of params, or a callable of params returning one) at each leaf."""
    if spec is None:
        return [default] * treedef.num_leaves
    tree = spec(params) if callable(spec) else spec
    full = jax.tree.map(lambda s, p: jax.tree.map(lambda _: s, p), tree, params,
                        is_leaf=lambda x: isinstance(x, BnbTensor))
    return treedef.flatten_up_to(full)


# ------------------------------------------------------------------------------------------------ the optimizer

def adamw_8bit(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, mask: Any = None, *, tensors: Any = None,
               min_8bit_size: int = MIN_8BIT_SIZE, backend: str = "cuda") -> optax.GradientTransformation:
    """bitsandbytes' AdamW8bit (see the module docstring) as an optax transformation; `update` needs the params.

    learning_rate: a float or an optax schedule of the update count (0-based); mask: where weight decay applies
    (a bool pytree prefix of the params or a callable returning one, as optax.adamw; None: everywhere); tensors:
    `BnbTensor`s the same way (None: each leaf is one row-major torch tensor); min_8bit_size: torch tensors of fewer
    elements keep float32 moments; backend: "cuda" or "cpu", which bitsandbytes kernel's arithmetic to follow."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; accepted: {', '.join(BACKENDS)}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size={min_8bit_size!r}; accepted: an int >= 0")
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r}; accepted: 0 <= {name} < 1")
    if not eps >= 0 or not weight_decay >= 0:
        raise ValueError(f"eps={eps!r}, weight_decay={weight_decay!r}; accepted: numbers >= 0")
    code1, code2 = dynamic_map(signed=True), dynamic_map(signed=False)
    tables = (_cpu_table(code1), _cpu_table(code2)) if backend == "cpu" else None
    f32 = np.float32
    if backend == "cuda":  # float32 constants, as the kernels compute them (1.0f - beta1)
        one_minus = (f32(1) - f32(b1), f32(1) - f32(b2))
    else:  # torch casts Python doubles (1 - beta1) to float32
        one_minus = (f32(1 - b1), f32(1 - b2))

    def layouts(params, treedef, leaves):
        found = _per_leaf(tensors, params, treedef, BnbTensor())
        for (path, leaf), t in zip(jax.tree_util.tree_flatten_with_path(params)[0], found):
            _check_layout(t, leaf.shape, jax.tree_util.keystr(path))
        return found

    def is_8bit(leaf, t: BnbTensor) -> bool:
        per_tensor = math.prod(leaf.shape[t.stack_axes:])
        return t.optim_bits == 8 and per_tensor >= min_8bit_size

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        moments = []
        for leaf, t in zip(leaves, layouts(params, treedef, leaves)):
            if is_8bit(leaf, t):
                moments.append((_zero_8bit(leaf, t), _zero_8bit(leaf, t)))
            else:
                moments.append((jnp.zeros_like(leaf, jnp.float32), jnp.zeros_like(leaf, jnp.float32)))
        return Adam8bitState(count=jnp.zeros((), jnp.int32), mu=treedef.unflatten([m for m, _ in moments]),
                             nu=treedef.unflatten([v for _, v in moments]))

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("adamw_8bit: update needs the params (tx.update(grads, state, params))")
        leaves, treedef = jax.tree_util.tree_flatten(params)
        grad_leaves = treedef.flatten_up_to(grads)
        decays = [weight_decay if bool(m) else 0.0 for m in _per_leaf(mask, params, treedef, True)]
        lr = jnp.asarray(learning_rate(state.count) if callable(learning_rate) else learning_rate, jnp.float32)
        step = (state.count + 1).astype(jnp.float32)
        if backend == "cuda":  # float32 powf, as the kernels
            c1 = 1.0 - jnp.power(f32(b1), step)
            c2 = jnp.sqrt(1.0 - jnp.power(f32(b2), step))
        else:  # torch: Python doubles 1 - beta**t (here -expm1(t log beta), accurate in float32)
            c1 = -jnp.expm1(step * f32(math.log(b1))) if b1 > 0 else jnp.ones((), jnp.float32)
            c2 = jnp.sqrt(-jnp.expm1(step * f32(math.log(b2)))) if b2 > 0 else jnp.ones((), jnp.float32)
        scalars = _Scalars(lr, c1, c2)
        new_p, mus, nus = [], [], []
        for p, g, m, v, t, wd in zip(leaves, grad_leaves, treedef.flatten_up_to(state.mu),
                                     treedef.flatten_up_to(state.nu), layouts(params, treedef, leaves), decays):
            if isinstance(m, Blockwise8bit):
                p1, m, v = step_8bit(p, g, m, v, t, wd, scalars)
            else:
                p1, m, v = step_32bit(p.astype(jnp.float32), g.astype(jnp.float32), m, v, wd, scalars)
            new_p.append(p1)
            mus.append(m)
            nus.append(v)
        updates = [(p1 - p.astype(jnp.float32)).astype(p.dtype) for p1, p in zip(new_p, leaves)]
        new_state = Adam8bitState(optax.safe_int32_increment(state.count), treedef.unflatten(mus),
                                  treedef.unflatten(nus))
        return treedef.unflatten(updates), new_state

    def step_32bit(p, g, m, v, wd, s):
        """bnb's 32-bit Adam kernel: p, g, m, v float32 [leaf shape]."""
        step_size = -s.lr * s.c2 / s.c1
        if backend == "cuda":
            m = m * f32(b1) + one_minus[0] * g
            v = v * f32(b2) + one_minus[1] * (g * g)
            p = p + step_size * (m / (jnp.sqrt(v) + f32(eps) * s.c2))
            return (p * (1.0 - s.lr * wd) if wd else p), m, v
        # torch's fused multiply-adds keep the product of g exact: written first, XLA on CPU fuses the same one
        m = one_minus[0] * g + m * f32(b1)
        v = (one_minus[1] * g) * g + v * f32(b2)
        p = p * (1.0 - s.lr * wd) if wd else p
        return step_size * (m / (jnp.sqrt(v) + f32(eps) * s.c2)) + p, m, v

    def step_8bit(p, g, m: Blockwise8bit, v: Blockwise8bit, t: BnbTensor, wd, s):
        """bnb's 8-bit blockwise Adam kernel over the leaf's torch tensors [S, blocks, 256]."""
        shape = p.shape
        g = _torch_tensors(g.astype(jnp.float32), t, 0.0)
        p32 = _torch_tensors(p.astype(jnp.float32), t, 0.0)
        stack = m.absmax.shape[:-1]
        absmax1, absmax2 = m.absmax.reshape(-1, m.absmax.shape[-1]), v.absmax.reshape(-1, v.absmax.shape[-1])
        # The CUDA kernel pads a tensor's last block with code 128 / 0 (it counts in the absmax); the CPU one with
        # nothing: a padded zero (code 127 of the signed map) changes no absmax.
        c1 = _torch_tensors(m.codes, t, 128 if backend == "cuda" else 127)
        c2 = _torch_tensors(v.codes, t, 0)
        m1 = jnp.asarray(code1)[c1.astype(jnp.int32)] * absmax1[..., None]  # [S, nb, 256]
        v1 = jnp.asarray(code2)[c2.astype(jnp.int32)] * absmax2[..., None]
        if backend == "cuda":
            finite = jnp.isfinite(g)
            v1 = jnp.where(finite, v1 * f32(b2) + (one_minus[1] * g) * g, 0.0)
            m1 = jnp.where(finite, m1 * f32(b1) + one_minus[0] * g, 0.0)
        else:  # as in step_32bit
            v1 = (one_minus[1] * g) * g + v1 * f32(b2)
            m1 = one_minus[0] * g + m1 * f32(b1)
        new_absmax1, new_absmax2 = jnp.max(jnp.abs(m1), axis=-1), jnp.max(jnp.abs(v1), axis=-1)  # [S, nb]
        if backend == "cuda":
            step_size = -s.lr * s.c2 / s.c1
            p1 = p32 + step_size * (m1 / (jnp.sqrt(v1) + s.c2 * f32(eps)))
            if wd:
                p1 = p1 * (1.0 - s.lr * wd)
            p1 = jnp.where(finite, p1, p32)
            q1 = _quantize_cuda(code1, m1, new_absmax1, signed=True)
            q2 = _quantize_cuda(code2, v1, new_absmax2, signed=False)
        else:
            denom = jnp.sqrt(v1) / s.c2 + f32(eps)
            p1 = p32 * (1.0 - s.lr * wd) if wd else p32
            p1 = p1 + ((-s.lr / s.c1) * m1) / denom
            q1 = _quantize_cpu(jnp.asarray(tables[0]), m1, new_absmax1)
            q2 = _quantize_cpu(jnp.asarray(tables[1]), v1, new_absmax2)
        m = Blockwise8bit(_leaf_layout(q1, t, shape), new_absmax1.reshape(*stack, -1))
        v = Blockwise8bit(_leaf_layout(q2, t, shape), new_absmax2.reshape(*stack, -1))
        return _leaf_layout(p1, t, shape), m, v

    return optax.GradientTransformation(init_fn, update_fn)


class _Scalars(NamedTuple):
    lr: jax.Array  # float32 []: this update's learning rate
    c1: jax.Array  # float32 []: 1 - b1**t
    c2: jax.Array  # float32 []: sqrt(1 - b2**t)
