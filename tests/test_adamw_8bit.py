"""bitsandbytes' 8-bit blockwise AdamW: the dynamic maps and both roundings equal bitsandbytes', five steps equal
`bnb.optim.AdamW8bit` (codes, absmax, 32-bit moments of small tensors, parameters) on CPU and, on a GPU with
bitsandbytes' CUDA library, its CUDA kernels; `AdamW(optim="adamw_8bit")` trains the tiny model under TrainStep
and its state survives an orbax checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastlora_jax import TRAINABLE, LlamaConfig
from fastlora_jax.adamw_8bit import (Adam8bitState, Blockwise8bit, BnbTensor, _cpu_table, _quantize_cpu,
                                     _quantize_cuda, _quantize_nearest, adamw_8bit, dynamic_map)
from fastlora_jax.checkpointing import Checkpointer
from fastlora_jax.loading import random_model
from fastlora_jax.lora import get_peft_model
from fastlora_jax.training import AdamW, TrainStep, bnb_tensors
from helpers import TINY

# name: (shape, how bnb sees it, weight decay). Sizes per torch tensor: 8192 (whole blocks), 6300 (a partial last
# block), 3000 (< 4096: float32 moments), 2 layers of [48, 100] = 4800 (transposed, partial block), 4 layers of 1280
# (< 4096 each though 5120 in all: float32 moments).
LEAVES = {"w": ((64, 128), BnbTensor(), True), "odd": ((70, 90), BnbTensor(), False),
          "small": ((3000,), BnbTensor(), True), "lora": ((2, 100, 48), BnbTensor(stack_axes=1, transpose=True), True),
          "thin": ((4, 40, 32), BnbTensor(stack_axes=1, transpose=True), False)}
LR, WD, STEPS = 1e-2, 0.1, 5


def problem(seed=0):
    """Params and STEPS gradients of LEAVES (each value's scale fixed over the steps, spanning 20x in a block)."""
    rng = np.random.default_rng(seed)
    params = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, (s, _, _) in LEAVES.items()}
    scales = {k: np.exp(rng.uniform(-3, 0, s)) * 1e-2 for k, (s, _, _) in LEAVES.items()}
    grads = [{k: (scales[k] * rng.standard_normal(s)).astype(np.float32) for k, (s, _, _) in LEAVES.items()}
             for _ in range(STEPS)]
    return params, grads


def torch_views(name, x):
    """The torch tensors bitsandbytes sees for a leaf (one per stacked layer, in torch's layout)."""
    t = LEAVES[name][1]
    return [np.ascontiguousarray(x[i].T if t.transpose else x[i]) for i in range(x.shape[0])] if t.stack_axes else [x]


def leaf_view(name, arrays):
    """The inverse of torch_views."""
    t = LEAVES[name][1]
    return np.stack([a.T if t.transpose else a for a in arrays]) if t.stack_axes else arrays[0]


def run_bnb(params, grads, device="cpu"):
    """STEPS steps of bnb.optim.AdamW8bit; returns {name: (param, state dicts per torch tensor)} as numpy."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    tensors = {k: [torch.nn.Parameter(torch.tensor(a, device=device)) for a in torch_views(k, v)]
               for k, v in params.items()}
    groups = [{"params": [p for k in tensors if LEAVES[k][2] for p in tensors[k]], "weight_decay": WD},
              {"params": [p for k in tensors if not LEAVES[k][2] for p in tensors[k]], "weight_decay": 0.0}]
    opt = bnb.optim.AdamW8bit(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        for k, ps in tensors.items():
            for p, a in zip(ps, torch_views(k, g[k])):
                p.grad = torch.tensor(a, device=device)
        opt.step()
    as_np = lambda x: x.detach().cpu().numpy() if hasattr(x, "detach") else x  # noqa: E731
    return {k: (leaf_view(k, [as_np(p) for p in ps]), [{n: as_np(x) for n, x in opt.state[p].items()} for p in ps])
            for k, ps in tensors.items()}


def run_ours(params, grads, backend):
    tx = adamw_8bit(LR, weight_decay=WD, mask={k: d for k, (_, _, d) in LEAVES.items()},
                    tensors={k: t for k, (_, t, _) in LEAVES.items()}, backend=backend)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
    return p, state


def compare(ours, state, ref, max_code_mismatch, param_atol=None):
    """Asserts our parameters and state equal bitsandbytes'; returns the code mismatch fraction of each moment.
    param_atol: the parameters' tolerance (default: a few float32 roundings)."""
    mismatches = {}
    for name, (shape, t, _) in LEAVES.items():
        ref_p, ref_states = ref[name]
        per_tensor = int(np.prod(shape[t.stack_axes:]))
        mu, nu = state.mu[name], state.nu[name]
        assert isinstance(mu, Blockwise8bit) == (per_tensor >= 4096) == (ref_states[0]["state1"].dtype == np.uint8)
        if isinstance(mu, Blockwise8bit):
            for ours_m, codes, absmax in ((mu, "state1", "absmax1"), (nu, "state2", "absmax2")):
                assert ours_m.codes.dtype == jnp.uint8 and ours_m.codes.shape == shape
                ref_codes = leaf_view(name, [s[codes] for s in ref_states])
                ref_absmax = np.stack([s[absmax] for s in ref_states]).reshape(ours_m.absmax.shape)
                mismatches[(name, codes)] = np.mean(np.asarray(ours_m.codes) != ref_codes)
                assert mismatches[(name, codes)] <= max_code_mismatch, (name, codes, mismatches[(name, codes)])
                np.testing.assert_allclose(ours_m.absmax, ref_absmax, rtol=3e-7, err_msg=f"{name} {absmax}")
        else:
            for ours_m, key in ((mu, "state1"), (nu, "state2")):
                ref_m = leaf_view(name, [s[key] for s in ref_states])
                np.testing.assert_allclose(ours_m, ref_m, rtol=1e-6, atol=1e-6 * np.abs(ref_m).max())
        scale = np.abs(ref_p).max()  # a few float32 roundings of the parameters
        tolerance = dict(rtol=5e-7, atol=2e-7 * scale) if param_atol is None else dict(rtol=0, atol=param_atol)
        np.testing.assert_allclose(ours[name], ref_p, err_msg=name, **tolerance)
    return mismatches


def test_dynamic_maps_and_roundings_equal_bitsandbytes():
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    rng = np.random.default_rng(0)
    for signed in (True, False):
        code = dynamic_map(signed)
        np.testing.assert_array_equal(code, functional.create_dynamic_map(signed=signed).numpy())
        x = (rng.standard_normal(256 * 64) * np.exp(rng.uniform(-16, 0, 256 * 64))).astype(np.float32)
        x = x if signed else np.abs(x)
        x[:256] = 0.0  # an all-zero block
        # bnb's CPU quantize_blockwise (what its CPU optimizer runs): bit for bit.
        ref_codes, ref_absmax = torch.ops.bitsandbytes.quantize_blockwise(torch.tensor(x), torch.tensor(code), 256)
        absmax = jnp.asarray(ref_absmax.numpy()).reshape(1, -1)
        codes = jax.jit(_quantize_cpu)(jnp.asarray(_cpu_table(code)), jnp.asarray(x).reshape(1, -1, 256), absmax)
        np.testing.assert_array_equal(np.asarray(codes).reshape(-1), ref_codes.numpy())
        # The CUDA kernels' rounding: the nearest entry, then (first moment) one entry towards the value's sign.
        quantize = jax.jit(lambda x, a, code=code, signed=signed: _quantize_cuda(code, x, a, signed))
        codes = quantize(jnp.asarray(x).reshape(1, -1, 256), absmax)
        codes = np.asarray(codes).reshape(-1, 256)
        scaled = x.reshape(-1, 256)[1:] / ref_absmax.numpy()[1:, None]
        expected = np.abs(scaled[..., None] - code).argmin(-1)
        if signed:
            flip = np.signbit(code[expected]) != np.signbit(scaled)
            expected = np.where(flip, np.where(scaled > 0, expected + 1, expected - 1), expected)
            assert flip.any()  # tiny negative values: the nearest entry is 0.0
            np.testing.assert_array_equal(codes[0], 255)  # 0 / 0 -> code 0, less one -> 255 (the kernel's uint8)
        else:
            np.testing.assert_array_equal(codes[0], 0)
        np.testing.assert_array_equal(codes[1:], expected)
    # A tiny negative first moment takes the smallest negative code, not 0.0 (index 127).
    code = dynamic_map(True)
    tiny = jnp.asarray([[[-1e-9] + [1.0] * 255]], jnp.float32)
    assert int(_quantize_cuda(code, tiny, jnp.ones((1, 1)), True)[0, 0, 0]) == 126


def nearest_code(code, x):
    """What bitsandbytes' CUDA quantize_2D returns, stated directly: the nearest entry of the sorted map by float32
    midpoints; a value exactly on a midpoint takes the even index of the two (the kernel's 7-step search always ends
    on an even pivot and keeps it on a tie); NaN takes 0."""
    mids = (code[:-1] + code[1:]) * np.float32(0.5)
    index = np.searchsorted(mids, x, side="left")
    on_midpoint = (index < len(mids)) & (x == mids[np.minimum(index, len(mids) - 1)])
    index = np.where(on_midpoint & (index % 2 == 1), index + 1, index)
    return np.where(np.isnan(x), 0, index)


def test_cuda_rounding_is_the_kernels_binary_search_on_every_edge():
    rng = np.random.default_rng(1)
    for signed in (True, False):
        code = dynamic_map(signed)
        mids = (code[:-1] + code[1:]) * np.float32(0.5)
        x = np.concatenate([rng.uniform(-1.1, 1.1, 20000), np.exp(rng.uniform(-20, 0, 20000)) * rng.choice([-1, 1], 20000),
                            code, mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)),
                            [np.nan, 0.0, -0.0, -1.0, 1.0, 2.0, -2.0, np.inf, -np.inf]]).astype(np.float32)
        # Every 2^16-float bucket's first and last value, and the values either side of them.
        starts = (np.arange(65536, dtype=np.uint32) << np.uint32(16)).view(np.float32)
        edges = np.concatenate([starts, (starts.view(np.uint32) | np.uint32(0xFFFF)).view(np.float32)])
        edges = edges[np.isfinite(edges) & (np.abs(edges) <= 2)]
        x = np.concatenate([x, edges, np.nextafter(edges, np.float32(2)), np.nextafter(edges, np.float32(-2))])
        ours = jax.jit(lambda x, code=code: _quantize_nearest(code, x))(jnp.asarray(x))
        np.testing.assert_array_equal(ours, nearest_code(code, x))


def test_five_steps_equal_bnb_adamw8bit_on_cpu():
    """Codes bit-identical (at most 1 in 10^4 may differ: XLA fuses other multiply-adds into FMAs than torch, so a
    moment can differ in its last bit, which moves a code only on a table boundary), absmax to 2 ulp, float32
    moments and parameters to float32 rounding."""
    params, grads = problem()
    ours, state = run_ours(params, grads, backend="cpu")
    mismatches = compare(ours, state, run_bnb(params, grads), max_code_mismatch=1e-4)
    assert {k for k, _ in mismatches} == {"w", "odd", "lora"}
    assert int(state.count) == STEPS


@pytest.mark.gpu
def test_five_steps_equal_bnb_adamw8bit_cuda_kernels():
    """The "cuda" backend against bitsandbytes' CUDA kernels (needs bitsandbytes with its CUDA library): codes
    differ only where the kernel's fast division (__fdividef) or FMAs move a value across a rounding boundary (none
    did on an H100); the parameters within what the kernels' fast-math bias corrections allow."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    params, grads = problem()
    ours, state = run_ours(params, grads, backend="cuda")
    # bitsandbytes' CUDA library is built with --use_fast_math: the bias corrections' powf is __powf (ex2/lg2.approx),
    # whose absolute error on log2(0.999) (-1.4e-3) is ~1e-4 of it, so sqrt(1 - 0.999**t) is off by up to ~1e-4 and
    # every update with it. An update is at most ~3 lr (|m / sqrt v| after bias correction), so over STEPS steps the
    # parameters may differ by 1e-4 * 3 * LR * STEPS ~ 1e-5; the moments, which no correction touches, stay exact.
    compare(ours, state, run_bnb(params, grads, device="cuda"), max_code_mismatch=1e-3, param_atol=2e-4 * LR * STEPS)


def test_backends_share_the_state_layout_and_the_small_tensor_rule():
    params, grads = problem(seed=1)
    (cuda_p, cuda_state), (cpu_p, cpu_state) = run_ours(params, grads, "cuda"), run_ours(params, grads, "cpu")
    assert jax.tree.map(lambda x: (x.shape, x.dtype), cuda_state) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                 cpu_state)
    moved = {k: (np.asarray(cuda_p[k]) - params[k], np.asarray(cpu_p[k]) - params[k]) for k in LEAVES}
    rel = {k: np.linalg.norm(a - b) / np.linalg.norm(b) for k, (a, b) in moved.items()}
    # 32-bit tensors: the same formulas, with the decay before (cpu) or after (cuda) the step: lr * wd apart.
    assert rel["thin"] < 1e-5 and rel["small"] < 1.5 * LR * WD, rel
    # 8-bit tensors: the roundings differ (16-bit table or nearest, the sign rule); the steps stay within ~1%.
    assert max(rel["w"], rel["odd"], rel["lora"]) < 0.03, rel


def lora_model(seed=0, r=64, config=TINY, **kw):
    model = random_model(LlamaConfig.from_hf_config(dict(config)), seed=seed)
    model.lm_head.weight.value = model.lm_head.weight[...] * 25  # logits away from uniform (see test_training)
    return get_peft_model(model, r=r, lora_alpha=r, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                          use_gradient_checkpointing=False, random_state=seed, **kw)


def batch(rows=4, length=32, seed=0):
    ids = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (rows, length)).astype(np.int32)
    return {"input_ids": ids, "labels": ids}


def adamw_8bit_settings(**kw):
    return AdamW(**{**dict(lr_scheduler_type="linear", learning_rate=3e-3, total_steps=30, warmup_steps=2,
                           weight_decay=0.01, optim="adamw_8bit"), **kw})


def frozen(model):
    return {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(TRAINABLE)))}


def test_train_step_with_adamw_8bit_lowers_the_loss_and_keeps_frozen_weights():
    model = lora_model()
    before = frozen(model)
    step = TrainStep(model, adamw_8bit_settings(), max_grad_norm=1.0)
    state = step.opt_state
    assert isinstance(state, Adam8bitState)
    # Per layer (as PEFT's torch tensors): q_proj's lora_a [64 r, 64 in] and lora_b [64 out, 64 r] and down_proj's
    # lora_a [64, 128] have >= 4096 values (8-bit); k/v_proj's lora_b [32 out, 64] has 2048 (float32 moments).
    def moment(*path):
        return state.mu["model"]["layers"][path[0]][path[1]][path[2]].get_value()

    for path in (("self_attn", "q_proj", "lora_a"), ("self_attn", "q_proj", "lora_b"), ("mlp", "down_proj", "lora_a")):
        assert isinstance(moment(*path), Blockwise8bit), path
    for path in (("self_attn", "k_proj", "lora_b"), ("self_attn", "v_proj", "lora_b")):
        assert moment(*path).dtype == jnp.float32, path
    q = moment("self_attn", "q_proj", "lora_a")
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 64, 64) and q.absmax.shape == (2, 16)
    data = batch()
    losses = [float(step(data)["loss"]) for _ in range(25)]
    assert losses[-1] < 0.3 * losses[0], losses
    after = frozen(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=str(path))
    assert int(step.opt_state.count) == 25


def test_optim_names_pick_the_transform_and_bnb_tensors_follow_peft():
    kw = dict(lr_scheduler_type="constant", learning_rate=1e-3, total_steps=10)
    model = lora_model(r=4, config={**TINY, "attention_bias": True}, modules_to_save=["embed_tokens", "lm_head"],
                       bias="lora_only")
    trainable = nnx.state(model, TRAINABLE)
    for optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        assert isinstance(AdamW(optim=optim, **kw).init(trainable), Adam8bitState)
    layouts = {tuple(str(getattr(k, "key", k)) for k in path): t for path, t in
               jax.tree_util.tree_flatten_with_path(bnb_tensors(trainable),
                                                    is_leaf=lambda x: isinstance(x, BnbTensor))[0]}
    by_name = {"/".join(k[-3:]): t for k, t in layouts.items()}
    assert by_name["self_attn/q_proj/lora_a"] == BnbTensor(stack_axes=1, transpose=True)
    assert by_name["model/embed_tokens/trainable_weight"] == BnbTensor(optim_bits=32)  # transformers' override
    assert by_name["lm_head/trainable_weight"] == BnbTensor(transpose=True)
    assert by_name["q_proj/base/bias"] == BnbTensor(stack_axes=1)
    embed = AdamW(optim="adamw_8bit", **kw).init(trainable).mu["model"]["embed_tokens"]["trainable_weight"]
    assert embed.get_value().dtype == jnp.float32  # [256, 64] = 16384 values, yet 32-bit
    # adamw_torch_fused is torch's AdamW numbers: the same updates as adamw_torch.
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), trainable)
    torch_fused, torch_plain = AdamW(optim="adamw_torch_fused", **kw), AdamW(optim="adamw_torch", **kw)
    a = torch_fused.update(grads, torch_fused.init(trainable), trainable)[0]
    b = torch_plain.update(grads, torch_plain.init(trainable), trainable)[0]
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_checkpoint_round_trip_of_the_8bit_state_resumes_identically(tmp_path):
    data = batch()
    source = TrainStep(lora_model(), adamw_8bit_settings(), max_grad_norm=1.0)  # the program of the test above
    for _ in range(3):
        source(data)
    with Checkpointer(tmp_path / "ckpt") as manager:
        manager.save(source)
        manager.wait()
        target = TrainStep(lora_model(), adamw_8bit_settings(), max_grad_norm=1.0)  # the same base, fresh adapters
        manager.restore(target)
        with pytest.raises(ValueError, match="optimizer state .* does not match"):  # a 32-bit AdamW's state
            manager.restore(TrainStep(lora_model(), adamw_8bit_settings(optim="adamw_torch")))
    leaves_s, leaves_t = jax.tree_util.tree_leaves(source.opt_state), jax.tree_util.tree_leaves(target.opt_state)
    assert {x.dtype for x in leaves_t} == {jnp.dtype(jnp.int32), jnp.dtype(jnp.uint8), jnp.dtype(jnp.float32)}
    for a, b in zip(leaves_s, leaves_t):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert target.step == 3
    ms, mt = source(data), target(data)  # the resumed run continues exactly as the original
    assert float(ms["loss"]) == float(mt["loss"])
    jax.tree.map(np.testing.assert_array_equal, nnx.state(source.model, TRAINABLE), nnx.state(target.model, TRAINABLE))


def test_bad_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="backend='tpu'; accepted: cuda, cpu"):
        adamw_8bit(1e-3, backend="tpu")
    with pytest.raises(ValueError, match="optim_bits=16; accepted: 8, 32"):
        BnbTensor(optim_bits=16)
    with pytest.raises(ValueError, match=r"shape \(10,\) cannot have 1 stacked axes and a transposed"):
        adamw_8bit(1e-3, tensors={"x": BnbTensor(stack_axes=1, transpose=True)}).init({"x": jnp.zeros(10)})
    tx = adamw_8bit(1e-3)
    params = {"x": jnp.zeros(5000)}
    with pytest.raises(ValueError, match="update needs the params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="optim='sgd'; accepted: adamw_torch, adamw_torch_fused, adamw_8bit"):
        AdamW(lr_scheduler_type="constant", learning_rate=1e-3, total_steps=10, optim="sgd")
