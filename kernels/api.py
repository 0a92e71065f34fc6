"""The one dispatch point the model calls for every linear layer: implementation "auto" | "xla" | "pallas"."""

from __future__ import annotations

import jax

from fastlora_jax.kernels import reference

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; accepted: {', '.join(IMPLEMENTATIONS)}")
    return implementation


def linear(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, implementation: str = "auto") -> jax.Array:
    """Frozen linear layer: x [..., in] @ w [in, out] (+ bias) -> [..., out]."""
    _check_implementation(implementation)
    return reference.linear_reference(x, w, bias)


def lora_linear(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scaling: float | jax.Array,
                bias: jax.Array | None = None, *, implementation: str = "auto") -> jax.Array:
    """x @ w + bias + scaling * (x @ a) @ b with w frozen: x [..., in], w [in, out], a [in, r], b [r, out]."""
    _check_implementation(implementation)
    return reference.lora_linear_reference(x, w, a, b, scaling, bias)
