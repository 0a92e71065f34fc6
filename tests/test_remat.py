"""Gradient checkpointing modes: same loss and gradients as no checkpointing; "unsloth" offloads layer inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from fastlora_jax import compiler_options, remat
from fastlora_jax.config import LlamaConfig
from fastlora_jax.lora import get_peft_model
from fastlora_jax.loss import causal_lm_loss
from fastlora_jax.model import Llama
from fastlora_jax.variables import TRAINABLE

from helpers import all_eqns, rel_err

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")  # float32 tolerances hold on a GPU too (no TF32)

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8)
B, T = 2, 24


@pytest.fixture(scope="module")
def split_model():
    """(graphdef, trainable, frozen, ids): a float32 LoRA model whose B factors are random (not PEFT's zeros)."""
    model = Llama(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    nnx.update(model, nnx.from_flat_state(
        [(p, v.replace(jax.random.normal(jax.random.key(i), v[...].shape) * 0.1)) for i, (p, v) in enumerate(flat)]))
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, CONFIG.vocab_size)
    return graphdef, trainable, frozen, ids


def _loss_fn(split_model, mode, mlp_chunk=None, scan_layers=True):
    graphdef, _, frozen, ids = split_model

    def mean_loss(trainable):
        model = nnx.merge(graphdef, trainable, frozen)
        model.model.gradient_checkpointing = mode
        model.model.mlp_chunk_size = mlp_chunk
        model.model.scan_layers = scan_layers
        loss_sum, n = causal_lm_loss(model, ids, ids, chunk_size=16)
        return loss_sum / n

    return mean_loss


@pytest.fixture(scope="module")
def reference(split_model):
    with jax.default_matmul_precision("highest"):  # module-scoped: set up before the function-scoped fixture
        return jax.jit(jax.value_and_grad(_loss_fn(split_model, False)))(split_model[1])


@pytest.mark.parametrize("mode, mlp_chunk, scan_layers", [
    (True, None, True), ("unsloth", None, True), ("dots", None, True), ("long_context", None, True),
    ("long_context", 20, True), (False, 16, True), (False, None, False), (True, None, False), ("dots", None, False),
    ("unsloth", 16, False)])
def test_mode_matches_no_checkpointing(split_model, reference, mode, mlp_chunk, scan_layers):
    """Every mode, with the layers scanned or as a Python loop, gives no-remat's loss and gradients."""
    loss, grads = jax.jit(jax.value_and_grad(_loss_fn(split_model, mode, mlp_chunk, scan_layers)))(
        split_model[1])
    ref_loss, ref_grads = reference
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(leaves) == len(ref_leaves) == 14  # A and B of 7 projections
    for g, r in zip(leaves, ref_leaves):
        assert float(jnp.linalg.norm(r)) > 0
        assert rel_err(g, r) < 1e-5


def _residual_shapes(split_model, mode, scan_layers) -> set[tuple[int, ...]]:
    """Shapes of the values the backward pass reads (the linearization's residuals)."""
    _, pullback = jax.linearize(_loss_fn(split_model, mode, scan_layers=scan_layers), split_model[1])
    return {tuple(leaf.shape) for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "shape")}


@pytest.mark.parametrize("mode", [False, "dots"])
def test_layer_loop_keeps_no_weight_slices(split_model, mode):
    """scan_layers=False: no layer's weight slice is kept for the backward pass (it is sliced again), and the
    saved activations are per layer, never stacked [L, ...] as a scan's residuals are."""
    D, F, L = CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.num_hidden_layers
    looped, scanned = _residual_shapes(split_model, mode, False), _residual_shapes(split_model, mode, True)
    assert not looped & {(D, F), (F, D), (D, CONFIG.q_size), (D, CONFIG.kv_size)}
    assert (L, B, T, F) in scanned and (B, T, F) in looped and (L, B, T, F) not in looped  # gate_proj's output


@pytest.mark.parametrize("mode, saved", [("dots", True), ("unsloth", True), (True, False)])
def test_lora_xa_saved(split_model, mode, saved):
    """ "dots" and "unsloth" keep each LoRA layer's x @ A [tokens, r] (stacked [L, tokens, r] by the scan): the
    backward pass does not read the projection's input again to recompute it; True recomputes it."""
    r, L = 4, CONFIG.num_hidden_layers
    assert ((L, B * T, r) in _residual_shapes(split_model, mode, True)) == saved
    assert ((B * T, r) in _residual_shapes(split_model, mode, False)) == saved


def _host_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value the jaxpr (and its sub-jaxprs) places in host memory."""
    return [tuple(v.aval.shape) for eqn in all_eqns(jaxpr) for v in eqn.outvars
            if "host" in str(getattr(v.aval, "memory_space", "")).lower()]


@pytest.mark.parametrize("mode, stacked", [("unsloth", CONFIG.num_hidden_layers),
                                           ("long_context", CONFIG.num_hidden_layers // 3), (True, None)])
def test_offload_structure(split_model, mode, stacked):
    """The backward pass reads the layer (or block) inputs from a [L, B, T, D] array in host memory.

    This checks the traced program, which is the same on every backend; the CPU backend's memory IS the host, so
    its compiled HLO has no transfers to show (the compiled check is `test_unsloth_compiled_moves_to_host`)."""
    jaxpr = jax.make_jaxpr(jax.grad(_loss_fn(split_model, mode)))(split_model[1]).jaxpr
    shapes = _host_shapes(jaxpr)
    if stacked is None:
        assert shapes == []
    else:
        assert (stacked, B, T, CONFIG.hidden_size) in shapes  # the scan's stacked residual lives on the host
        assert (B, T, CONFIG.hidden_size) in shapes  # each layer's input is moved there inside the scan


@pytest.mark.gpu
def test_unsloth_compiled_moves_to_host(split_model):
    """On the GPU the compiled step keeps the stacked layer inputs in host memory space S(5)."""
    compiled = jax.jit(jax.grad(_loss_fn(split_model, "unsloth"))).lower(split_model[1]).compile()
    hlo = compiled.as_text()
    L, D = CONFIG.num_hidden_layers, CONFIG.hidden_size
    assert any(f"f32[{L},{B},{T},{D}]" in line and "S(5)" in line for line in hlo.splitlines())
    stats = compiled.memory_analysis()
    assert stats.host_temp_size_in_bytes >= L * B * T * D * 4


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["unsloth", "long_context"])
def test_pipelined_host_offloading_keeps_the_gradients(split_model, mode):
    """fastlora_jax.compiler_options() fetches offloaded layer inputs one scan iteration ahead: the gradients are
    those of the step compiled without that option (a value fetched too early or too late would change them)."""
    grad = jax.grad(_loss_fn(split_model, mode))
    pipelined = jax.jit(grad, compiler_options=compiler_options())(split_model[1])
    plain = jax.jit(grad, compiler_options=compiler_options("xla_gpu_enable_pipelined_host_offloading=false"))(
        split_model[1])
    for g, r in zip(jax.tree.leaves(pipelined), jax.tree.leaves(plain)):
        assert float(jnp.linalg.norm(r)) > 0
        assert rel_err(g, r) < 1e-6


@pytest.mark.gpu
def test_dots_runs_cudnn_attention_forward_once(split_model):
    """ "dots" saves cuDNN attention's output and statistics: its forward kernel is not run again in the backward."""
    graphdef, trainable, frozen, ids = split_model
    frozen = jax.tree.map(lambda a: a.astype(jnp.bfloat16), frozen)
    hlo = jax.jit(jax.grad(_loss_fn((graphdef, trainable, frozen, ids), "dots"))).lower(trainable).compile().as_text()
    assert hlo.count('custom_call_target="__cudnn$fmhaSoftmax"') == 1
    assert hlo.count('custom_call_target="__cudnn$fmhaSoftmaxBackward"') == 1


def test_validate_names_accepted_modes():
    assert remat.validate("True") is True and remat.validate("false") is False
    assert remat.layers_per_block("long_context", 32) == 4 and remat.layers_per_block("long_context", 6) == 3
    assert remat.layers_per_block("unsloth", 32) == 1
    with pytest.raises(ValueError, match="accepted: False, True, 'unsloth'"):
        remat.validate("offload")
