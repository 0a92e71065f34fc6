"""get_peft_model on our side: config, init methods, errors, repeated calls, trainable state and one optimizer step."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fastlora_jax
from fastlora_jax import Llama, LlamaConfig, preset
from fastlora_jax.linear import LoraLinear
from fastlora_jax.lora import LoraConfig, get_peft_model, targeted_module_names
from fastlora_jax.modules_to_save import SavedEmbed, SavedLinear
from fastlora_jax.variables import Frozen, TrainableBias, TrainableCopy

TINY = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8)


def tiny(seed=0, dtype=jnp.float32, **overrides) -> Llama:
    cfg = dataclasses.replace(TINY, **overrides)
    return Llama(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, x, rng=None):
    return model(x, dropout_rng=rng)


def ids(seed=1, shape=(2, 7)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, shape))


def test_1b_default_line(capsys):
    model = nnx.eval_shape(lambda: get_peft_model(Llama(preset("llama-3.2-1b"), dtype=jnp.bfloat16)))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        "trainable params: 11,272,192 || all params: 1,247,086,592 || trainable%: 0.9039\n")
    assert model.get_nb_trainable_parameters() == (11_272_192, 1_247_086_592)
    assert model.model.gradient_checkpointing == "unsloth"
    assert hash(model.peft_config) == hash(LoraConfig())


def test_default_init_has_float32_lora_params():
    model = get_peft_model(tiny(dtype=jnp.bfloat16))
    q = model.model.layers.self_attn.q_proj
    assert isinstance(q, LoraLinear) and isinstance(q.lora_a, nnx.LoRAParam)
    assert q.lora_a[...].dtype == jnp.float32 and q.lora_a[...].shape == (3, 32, 16)
    assert q.lora_b[...].shape == (3, 16, 32) and not np.any(np.asarray(q.lora_b[...]))
    assert isinstance(q.base.weight, Frozen) and q.base.weight[...].dtype == jnp.bfloat16
    # A ~ kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in)), so the std is 1/sqrt(3 in)
    a = np.asarray(model.model.layers.mlp.down_proj.lora_a[...])  # in = 64
    assert np.abs(a).max() <= 1 / 8 and abs(a.std() - 1 / math.sqrt(3 * 64)) < 0.01
    assert jax.eval_shape(lambda m: m(ids()), model).dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def base_logits():
    return np.asarray(forward(tiny(), ids()))


@pytest.mark.parametrize("init", [True, "pissa", "pissa_niter_4", "olora"])
def test_init_keeps_the_function(init, base_logits):
    """At init the model computes what the base did (exactly for True; pissa / olora move W - s B A to the base)."""
    model = tiny()
    w = np.asarray(model.model.layers.self_attn.v_proj.weight[...])
    get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=init, layers_to_transform=[0, 2])
    out = np.asarray(forward(model, ids()))
    v = model.model.layers.self_attn.v_proj
    if init is True:
        np.testing.assert_array_equal(out, base_logits)
        return
    np.testing.assert_allclose(out, base_logits, atol=1e-4)
    merged = np.asarray(v.base.weight[...] + v.delta_weight())
    np.testing.assert_allclose(merged, w, atol=1e-5)
    assert not np.allclose(np.asarray(v.base.weight[...])[0], w[0])  # residual in transformed layers
    np.testing.assert_array_equal(np.asarray(v.base.weight[...])[1], w[1])  # untouched elsewhere
    assert np.any(np.asarray(v.lora_b[...])[0]) and not np.any(np.asarray(v.lora_b[...])[1])


def test_loftq_reduces_the_quantization_error():
    model = tiny()
    w = np.asarray(model.model.layers.mlp.up_proj.weight[...])
    get_peft_model(model, r=8, target_modules=["up_proj"], init_lora_weights="loftq",
                   loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    up = model.model.layers.mlp.up_proj
    base = np.asarray(up.base.weight[...])
    for i in range(3):  # the base holds an NF4-dequantized weight: its values are code * block absmax
        assert len(np.unique(base[i].T.reshape(-1, 64)[0])) <= 16
    # LoftQ sets A, B so that base + B A (scaling ignored, as PEFT) approximates W better than the base alone
    lowrank = np.einsum("lir,lro->lio", np.asarray(up.lora_a[...]), np.asarray(up.lora_b[...]))
    assert np.linalg.norm(base + lowrank - w) < 0.9 * np.linalg.norm(base - w)
    assert model.peft_config.loftq_config == (("loftq_bits", 4), ("loftq_iter", 2))


def _nf4_model():
    """A tiny model whose q_proj is an NF4Linear holding the quantized weights."""
    from fastlora_jax import nf4

    model = tiny()
    q = model.model.layers.self_attn.q_proj
    weights = nf4.stack_nf4([nf4.quantize_nf4(np.asarray(q.weight[...])[i].T) for i in range(3)])
    model.model.layers.self_attn.q_proj = nf4.NF4Linear.from_nf4(weights)
    return model


def test_inits_over_an_nf4_base():
    from fastlora_jax import nf4

    model = _nf4_model()
    dense = np.asarray(model.model.layers.self_attn.q_proj.dense_weight())
    get_peft_model(model, r=4, target_modules=["q_proj"], init_lora_weights="olora", layers_to_transform=[0, 1])
    q = model.model.layers.self_attn.q_proj
    assert isinstance(q.base, nf4.NF4Linear)
    merged = np.asarray(q.base.dense_weight() + q.delta_weight())
    assert np.linalg.norm(merged - dense) < 0.2 * np.linalg.norm(dense)  # the residual is quantized again
    np.testing.assert_array_equal(merged[2], dense[2])  # layer 2 keeps its codes
    with pytest.raises(TypeError, match="PiSSA"):
        get_peft_model(_nf4_model(), target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="full-precision"):
        get_peft_model(_nf4_model(), target_modules=["q_proj"], init_lora_weights="loftq",
                       loftq_config={"loftq_bits": 4})
    model = get_peft_model(_nf4_model(), r=4)
    assert isinstance(model.model.layers.self_attn.q_proj.base, nf4.NF4Linear)
    # PEFT counts a 4-bit weight at its unquantized size
    assert model.get_nb_trainable_parameters() == get_peft_model(tiny(), r=4).get_nb_trainable_parameters()


def test_layer_scale_and_counts_follow_layers_to_transform():
    model = get_peft_model(tiny(), r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=1)
    q = model.model.layers.self_attn.q_proj
    np.testing.assert_array_equal(q.layer_scale[...], [0.0, 1.0 * 16 / 4, 0.0])
    assert not np.any(np.asarray(q.lora_a[...])[[0, 2]])
    assert isinstance(model.model.layers.self_attn.k_proj, fastlora_jax.linear.Linear)
    assert targeted_module_names(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * (32 + 32) + 4 * (32 + 16)


def test_regex_all_linear_and_rslora():
    model = get_peft_model(tiny(), target_modules=r".*\.layers\.[02]\.mlp\.(up|down)_proj", use_rslora=True, r=4)
    assert targeted_module_names(model) == [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 2) for p in ("up", "down")]
    assert model.model.layers.mlp.up_proj.scaling == 16 / 2
    model = get_peft_model(tiny(tie_word_embeddings=False), target_modules="all-linear")
    names = targeted_module_names(model)
    assert len(names) == 21 and "lm_head" not in names


def test_lm_head_lora_and_modules_to_save_untied():
    model = tiny(tie_word_embeddings=False, dtype=jnp.bfloat16)
    table = np.asarray(model.model.embed_tokens.weight[...], np.float32)
    get_peft_model(model, target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"])
    assert isinstance(model.lm_head, LoraLinear) and model.lm_head.lora_a[...].shape == (32, 16)
    emb = model.model.embed_tokens
    assert isinstance(emb, SavedEmbed) and isinstance(emb.trainable_weight, TrainableCopy)
    assert emb.trainable_weight[...].dtype == jnp.float32 and model.dtype == jnp.bfloat16
    x = ids()
    assert emb(x).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(emb(x), np.float32), table[np.asarray(x)])
    assert jax.eval_shape(lambda m: m(x), model).dtype == jnp.bfloat16
    # modules_to_save wins over target_modules (PEFT never puts LoRA on a saved module)
    model = get_peft_model(tiny(tie_word_embeddings=False), modules_to_save=["lm_head"], target_modules="all-linear")
    assert isinstance(model.lm_head, SavedLinear)


def test_tied_modules_to_save_is_one_copy_serving_both():
    model = get_peft_model(tiny(tie_word_embeddings=True), modules_to_save=["embed_tokens", "lm_head"],
                           ensure_weight_tying=True)
    assert model.lm_head is None and isinstance(model.model.embed_tokens, SavedEmbed)
    assert model.peft_config.ensure_weight_tying
    copies = nnx.state(model, TrainableCopy)
    assert len(jax.tree.leaves(copies)) == 1
    copy = model.model.embed_tokens.trainable_weight
    copy.value = copy[...] + 0.5
    hidden = jnp.ones((1, 1, TINY.hidden_size))
    np.testing.assert_allclose(model.logits(hidden)[0, 0], np.asarray(copy[...]).sum(-1), rtol=1e-5)


def test_unsloth_only_keywords():
    """Unsloth's get_peft_model extras with Unsloth's meaning: "embed_tokens" in target_modules trains the embedding
    fully (modules_to_save), finetune_last_n_layers picks the last layers, "loftq" without a config uses 4 bits and
    one iteration, temporary_location is ignored."""
    model = get_peft_model(tiny(tie_word_embeddings=False), target_modules=["q_proj", "embed_tokens"],
                           temporary_location="_unsloth_temporary_saved_buffers")
    assert model.peft_config.target_modules == ("q_proj",) and model.peft_config.modules_to_save == ("embed_tokens",)
    assert isinstance(model.model.embed_tokens, SavedEmbed) and model.lm_head is not None
    model = get_peft_model(tiny(), target_modules=["v_proj"], finetune_last_n_layers=2)
    assert model.peft_config.layers_to_transform == (1, 2)
    assert targeted_module_names(model) == ["model.layers.1.self_attn.v_proj", "model.layers.2.self_attn.v_proj"]
    model = get_peft_model(tiny(), target_modules=["v_proj"], finetune_last_n_layers=2, layers_to_transform=[0])
    assert model.peft_config.layers_to_transform == (0,)
    with pytest.warns(UserWarning, match="loftq_bits=4, loftq_iter=1"):
        model = get_peft_model(tiny(), r=4, target_modules=["q_proj"], init_lora_weights="loftq")
    assert dict(model.peft_config.loftq_config) == {"loftq_bits": 4, "loftq_iter": 1}


def test_tied_modules_to_save_needs_ensure_weight_tying():
    """Unsloth's default ensure_weight_tying=False trains a tied model's embedding and head apart (PEFT), which we do
    not support: it raises, naming the flag, instead of training one shared copy."""
    for saved in (["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]):
        model = tiny(tie_word_embeddings=True)
        with pytest.raises(NotImplementedError, match="ensure_weight_tying=True"):
            get_peft_model(model, modules_to_save=saved)
        assert model.peft_config is None
        assert get_peft_model(model, modules_to_save=saved, ensure_weight_tying=True).peft_config.ensure_weight_tying
    with pytest.warns(UserWarning, match="ensure_weight_tying=True has no effect"):
        get_peft_model(tiny(tie_word_embeddings=False), modules_to_save=["lm_head"], ensure_weight_tying=True)


def test_for_training_use_gradient_checkpointing():
    from fastlora_jax import FastLanguageModel

    model = get_peft_model(tiny(), r=4, use_gradient_checkpointing="unsloth")
    FastLanguageModel.for_inference(model)
    assert FastLanguageModel.for_training(model).model.gradient_checkpointing == "unsloth"  # True: keep the mode
    assert model.training
    assert FastLanguageModel.for_training(model, use_gradient_checkpointing=False).model.gradient_checkpointing is False
    FastLanguageModel.for_training(model, use_gradient_checkpointing="dots")
    assert model.model.gradient_checkpointing == "dots"
    with pytest.raises(ValueError, match="use_gradient_checkpointing='yes'"):
        FastLanguageModel.for_training(model, use_gradient_checkpointing="yes")


def test_biases():
    cfg = dict(attention_bias=True, mlp_bias=True)
    model = get_peft_model(tiny(**cfg), bias="all", target_modules=["q_proj"])
    assert isinstance(model.model.layers.self_attn.q_proj.base.bias, TrainableBias)
    assert isinstance(model.model.layers.mlp.down_proj.bias, TrainableBias)
    assert model.model.layers.mlp.down_proj.bias[...].dtype == jnp.float32
    model = get_peft_model(tiny(**cfg), bias="lora_only", target_modules=["q_proj"])
    assert isinstance(model.model.layers.self_attn.q_proj.base.bias, TrainableBias)
    assert isinstance(model.model.layers.self_attn.k_proj.bias, Frozen)
    lora = 3 * 16 * (32 + 32)
    assert model.get_nb_trainable_parameters()[0] == lora + 3 * 32


def test_second_call():
    model = get_peft_model(tiny(), r=8)
    with pytest.warns(UserWarning, match="already has these LoRA adapters"):
        assert get_peft_model(model, r=8, max_seq_length=4096) is model
    with pytest.raises(ValueError, match="r differ"):
        get_peft_model(model, r=4)
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        get_peft_model(model, r=8, use_gradient_checkpointing=False)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(r=0), ValueError, r"r=0; accepted: an int > 0"),
    (dict(r=4.0), ValueError, r"r=4.0"),
    (dict(target_modules=["qproj"]), ValueError, r"no module matches 'qproj'; linear layers are q_proj, k_proj"),
    (dict(target_modules="model\\.nothing"), ValueError, "no module matches"),
    (dict(target_modules=["self_attn"]), ValueError, "not a linear layer"),
    (dict(target_modules=["embed_tokens"]), ValueError, "leaves no module for LoRA"),
    (dict(target_modules=["model.embed_tokens"]), NotImplementedError, "modules_to_save"),
    (dict(modules_to_save=["lm_head"]), NotImplementedError, "ensure_weight_tying=True"),
    (dict(target_modules=["q_proj", "embed_tokens"]), NotImplementedError, "ensure_weight_tying=True"),
    (dict(finetune_last_n_layers=1.5), ValueError, r"finetune_last_n_layers=1.5; accepted"),
    (dict(target_modules=["lm_head"]), NotImplementedError, "tied"),
    (dict(bias="some"), ValueError, r"bias='some'; accepted: 'none', 'all', 'lora_only'"),
    (dict(layers_to_transform=[0, 3]), ValueError, r"layer 3 is out of range; the model has 3 layers \(0..2\)"),
    (dict(layers_to_transform=[1], layers_pattern="blocks"), ValueError, "selects no module"),
    (dict(target_modules="all-linear", layers_to_transform=[1]), ValueError, "cannot be used"),
    (dict(layers_pattern="layers"), ValueError, "needs layers_to_transform"),
    (dict(lora_dropout=1.0), ValueError, r"lora_dropout=1.0; accepted: a number in \[0, 1\)"),
    (dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
    (dict(init_lora_weights="kaiming"), ValueError, r"init_lora_weights='kaiming' is not supported; accepted"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}), NotImplementedError, "loftq_bits=8"),
    (dict(use_gradient_checkpointing="yes"), ValueError, r"use_gradient_checkpointing='yes'; accepted"),
    (dict(modules_to_save=["embeddings"]), ValueError, r"'embeddings' is not a module of the model; modules are"),
    (dict(modules_to_save=["norm"]), NotImplementedError, "only 'embed_tokens' and 'lm_head'"),
    (dict(target_modules=["q_proj", "lm_head"], modules_to_save=["head"]), ValueError, "either LoRA-adapted"),
    (dict(use_dora=True), TypeError, r"unexpected keyword arguments \['use_dora'\]"),
])
def test_errors(kwargs, error, match):
    model = tiny(tie_word_embeddings=kwargs.get("modules_to_save") != ["head"])
    with pytest.raises(error, match=match):
        get_peft_model(model, **kwargs)
    assert model.peft_config is None and isinstance(model.model.layers.self_attn.q_proj, fastlora_jax.linear.Linear)


def test_numpy_scalars_are_taken_as_their_python_values():
    """PEFT takes r=np.int64(8) and friends (e.g. from a sweep's numpy grid): so do we, stored as Python numbers."""
    config = get_peft_model(tiny(), r=np.int64(8), lora_alpha=np.float32(16), lora_dropout=np.float64(0.0),
                            random_state=np.int32(1)).peft_config
    assert (config.r, config.lora_alpha, config.random_state) == (8, 16.0, 1) and type(config.r) is int
    assert config == get_peft_model(tiny(), r=8, lora_alpha=16.0, random_state=1).peft_config


def test_dropout_only_with_rng_and_only_on_the_lora_branch():
    model = get_peft_model(tiny(), lora_dropout=0.5, init_lora_weights=False)
    x = ids()
    eval_out = forward(model, x)
    np.testing.assert_array_equal(forward(model, x), eval_out)
    a = forward(model, x, jax.random.key(0))
    b = forward(model, x, jax.random.key(1))
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, forward(model, x, jax.random.key(0)))
    # With B = 0 the LoRA branch is zero, so dropout changes nothing: it never touches the base path.
    for layer in (model.model.layers.self_attn.q_proj, model.model.layers.mlp.down_proj):
        layer.lora_b.value = jnp.zeros_like(layer.lora_b[...])
    for name in ("k_proj", "v_proj", "o_proj"):
        layer = getattr(model.model.layers.self_attn, name)
        layer.lora_b.value = jnp.zeros_like(layer.lora_b[...])
    for name in ("gate_proj", "up_proj"):
        layer = getattr(model.model.layers.mlp, name)
        layer.lora_b.value = jnp.zeros_like(layer.lora_b[...])
    np.testing.assert_array_equal(forward(model, x, jax.random.key(0)), forward(model, x))


def test_dropout_with_some_projections_left_frozen():
    # PEFT's common set-up (q and v only, dropout on): the frozen k, o and MLP layers take no dropout rng.
    model = get_peft_model(tiny(), lora_dropout=0.1, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    x = ids()
    a, eval_out = forward(model, x, jax.random.key(0)), forward(model, x)
    assert a.shape == eval_out.shape and not np.allclose(a, eval_out)


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_trains_the_saved_head(tied):
    # The chunked loss reads the output head's weight itself: under modules_to_save it must be the trained copy, so
    # its loss and gradients equal those of the full logits (which the module's forward computes).
    from fastlora_jax.loss import causal_lm_loss

    model = get_peft_model(tiny(tie_word_embeddings=tied), r=4, modules_to_save=["lm_head"], init_lora_weights=False,
                           ensure_weight_tying=tied)
    saved = model.model.embed_tokens if tied else model.lm_head
    saved.trainable_weight.value = saved.trainable_weight[...] * 3.0  # the copy now differs from the original
    graphdef, trainable, frozen = nnx.split(model, fastlora_jax.TRAINABLE, ...)
    x = ids()

    def chunked(trainable):
        total, count = causal_lm_loss(nnx.merge(graphdef, trainable, frozen), x, x, chunk_size=4)
        return total / count

    def full_logits(trainable):
        logits = nnx.merge(graphdef, trainable, frozen)(x)[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    (loss, grads), (ref_loss, ref_grads) = jax.value_and_grad(chunked)(trainable), jax.value_and_grad(full_logits)(
        trainable)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    flat, ref_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(ref_grads))
    assert flat.keys() == ref_flat.keys()
    for path in flat:
        g, r = np.asarray(flat[path][...]), np.asarray(ref_flat[path][...])
        assert np.abs(g - r).max() <= 1e-4 * max(np.abs(r).max(), 1e-6), path
    head_grad = flat[("model", "embed_tokens", "trainable_weight") if tied else ("lm_head", "trainable_weight")]
    assert np.abs(np.asarray(head_grad[...])).max() > 0


@pytest.mark.parametrize("tied", [True, False])
def test_float32_modules_to_save_trains_under_a_donating_step(tied):
    # The float32 master copy of a float32 weight must be its own buffer: make_train_step donates the trainable
    # state and passes the frozen state beside it, so a shared buffer would be donated and read in one call.
    model = get_peft_model(tiny(tie_word_embeddings=tied), r=4, modules_to_save=["lm_head"], ensure_weight_tying=tied)
    frozen_before = np.asarray(model.lm_head.weight[...] if not tied else model.model.embed_tokens.weight[...])
    step = fastlora_jax.make_train_step(model, optax.adam(1e-2))
    x = ids()
    losses = [float(step(dict(input_ids=x, labels=x))["loss"]) for _ in range(2)]
    assert losses[1] < losses[0]
    saved = model.model.embed_tokens if tied else model.lm_head
    np.testing.assert_array_equal(np.asarray(saved.weight[...]), frozen_before)  # the original stays as it was
    assert not np.array_equal(np.asarray(saved.trainable_weight[...]), frozen_before)


def test_one_optimizer_step_updates_exactly_the_trainable_state():
    model = get_peft_model(tiny(tie_word_embeddings=False, attention_bias=True), r=4, init_lora_weights=False,
                           bias="all", modules_to_save=["lm_head"])
    trainable = nnx.state(model, fastlora_jax.TRAINABLE)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=fastlora_jax.TRAINABLE)
    before = jax.tree.map(np.asarray, nnx.state(model))
    x = ids(shape=(2, 9))

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(model):
            logits = model(x[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, fastlora_jax.TRAINABLE))(model)
        optimizer.update(model, grads)
        return grads

    grads = step(model, optimizer, x)
    assert sum(g.size for g in jax.tree.leaves(grads)) == n_trainable
    opt_leaves = jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
    # Adam's mu and nu for exactly the trainable leaves, plus scalar step counts
    assert sum(s.size for s in opt_leaves if s.ndim) == 2 * n_trainable
    assert sum(s.size for s in opt_leaves if not s.ndim) <= 2
    mask = fastlora_jax.trainable_mask(model)
    after = nnx.to_flat_state(nnx.state(model))
    flat_before = dict(nnx.to_flat_state(before))
    flat_mask = dict(nnx.to_flat_state(mask))
    n_checked = 0
    for path, var in after:
        old, new = flat_before[path][...], np.asarray(var[...])
        is_trainable = flat_mask[path]
        if getattr(is_trainable, "value", is_trainable):
            assert not np.array_equal(old, new), path
        else:
            np.testing.assert_array_equal(old, new, err_msg=str(path))
        n_checked += 1
    assert n_checked == len(flat_before)
