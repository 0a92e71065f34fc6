"""Linear-layer kernels for fastlora_jax: one dispatch point (`api`), pure-jnp references, Pallas kernels.

Import as `fastlora_jax.kernels`; this package never imports the model.
"""

from fastlora_jax.kernels.api import IMPLEMENTATIONS, linear, lora_linear

__all__ = ["IMPLEMENTATIONS", "linear", "lora_linear"]
