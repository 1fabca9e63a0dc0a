"""Recipes against hand-written references: presets, decay masks, freezing, layer-wise LR decay."""

import dataclasses
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import treeglob as tg

# ----------------------------------------------------------------------------
# Weight-decay presets: each against a transcription of the convention it names


def named(params):
    return dict(zip(tg.paths(params), jax.tree.leaves(params), strict=True))


def no_decay_of(params, rules):
    return {
        p
        for p, label in zip(tg.paths(params), jax.tree.leaves(tg.labels(params, rules)), strict=True)
        if label == "no_decay"
    }


def nanogpt_reference(params):
    # nanoGPT configure_optimizers: decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
    return {n for n, p in named(params).items() if not p.ndim >= 2}


def timm_reference(params, no_weight_decay_list=()):
    # timm param_groups_weight_decay
    return {
        n
        for n, p in named(params).items()
        if p.ndim <= 1 or n.endswith(".bias") or n in set(no_weight_decay_list)
    }


def hf_reference(model):
    # transformers get_parameter_names(model, [LayerNorm], forbidden_name_patterns), walked over
    # an Equinox module the way PyTorch walks named_children / _parameters.
    patterns = [
        re.compile(p) for p in [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    ]

    def children(node):
        if isinstance(node, eqx.Module):
            items = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
        elif isinstance(node, list | tuple):
            items = [(str(i), x) for i, x in enumerate(node)]
        else:
            return [], []
        mods = [(k, v) for k, v in items if isinstance(v, eqx.Module | list | tuple)]
        arrays = [k for k, v in items if eqx.is_array(v)]
        return mods, arrays

    def names(node):
        mods, arrays = children(node)
        result = []
        for name, child in mods:
            result += [
                f"{name}.{n}"
                for n in names(child)
                if not isinstance(child, eqx.nn.LayerNorm)
                and not any(p.search(f"{name}.{n}".lower()) for p in patterns)
            ]
        result += [k for k in arrays if not any(p.search(k.lower()) for p in patterns)]
        return result

    decay = set(names(model))
    return {n for n in tg.paths(eqx.filter(model, eqx.is_array)) if n not in decay}


def test_nanogpt_preset_matches_nanogpt(params):
    assert no_decay_of(params, tg.presets.NANOGPT) == nanogpt_reference(params)


def test_timm_preset_matches_timm_with_a_no_weight_decay_list(params):
    assert no_decay_of(params, tg.presets.TIMM) == timm_reference(params)
    rules = [(tg.optional(["^embed.weight$", "^cls_token$"]), "no_decay"), *tg.presets.TIMM]
    assert no_decay_of(params, rules) == timm_reference(params, ["embed.weight", "cls_token"])


def test_hf_preset_matches_hf_trainer(transformer, params):
    assert no_decay_of(params, tg.presets.HF) == hf_reference(transformer)


def test_hf_preset_on_hf_style_names():
    # Names as HF models spell them: only the name patterns decide here.
    tree = {
        "encoder": {
            "layer": [
                {
                    "attention": {
                        "output": {"LayerNorm": {"weight": np.ones(4)}, "dense": {"weight": np.ones((4, 4))}}
                    }
                }
            ],
            "final_layer_norm": {"weight": np.ones(4)},
            "norm": {"weight": np.ones(4)},
            "normalizer": {"weight": np.ones((4, 4))},
        },
        "embeddings": {"word_embeddings": {"weight": np.ones((9, 4))}},
    }
    names = tg.paths(tree)
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    expected = {n for n in names if any(re.search(p, n.lower()) for p in patterns)}
    assert no_decay_of(tree, tg.presets.HF) == expected
    assert "encoder.normalizer.weight" not in expected and "embeddings.word_embeddings.weight" not in expected


def test_default_preset_golden(params):
    decayed = {p for p in tg.paths(params) if p not in no_decay_of(params, tg.presets.DEFAULT)}
    assert decayed == {
        f"blocks.{i}.{leaf}"
        for i in range(2)
        for leaf in [
            "attn.query_proj.weight",
            "attn.key_proj.weight",
            "attn.value_proj.weight",
            "attn.output_proj.weight",
            "mlp.layers.0.weight",
            "mlp.layers.1.weight",
        ]
    } | {"head.weight"}


@pytest.mark.parametrize(
    "name, decays",
    [
        ("wte", False),
        ("pos_embed", False),
        ("cls_token", False),
        ("tok_embeddings", False),
        ("patch_embed", True),
        ("norm1", False),
        ("ln_f", False),
        ("LayerNorm", False),
        ("linear", True),
        ("qkv", True),
    ],
)
def test_default_preset_by_name(name, decays):
    tree = {name: {"weight": np.ones((4, 4))}, "other": {"weight": np.ones((4, 4))}}
    assert tg.labels(tree, tg.presets.DEFAULT)[name]["weight"] == ("decay" if decays else "no_decay")


@pytest.mark.parametrize("preset", ["DEFAULT", "NANOGPT", "TIMM", "HF"])
def test_presets_apply_to_models_lacking_components(preset):
    # No norm, no embedding, no bias, nothing 1-D: the exclusion rule matches nothing.
    only_matrices = {"w1": np.ones((3, 3)), "w2": np.ones((3, 2))}
    assert tg.labels(only_matrices, getattr(tg.presets, preset)) == {"w1": "decay", "w2": "decay"}
    mlp = eqx.filter(eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0)), eqx.is_array)
    tg.labels(mlp, getattr(tg.presets, preset))  # no NoMatchError


def test_a_typo_in_a_rule_added_to_a_preset_is_still_caught(params):
    with pytest.raises(tg.NoMatchError, match=r"glob\('hed'\).*\n.*Close matches in the tree: head"):
        tg.labels(params, [("hed", "no_decay"), *tg.presets.DEFAULT])


def test_preset_rules_read_as_data():
    assert [label for _, label in tg.presets.DEFAULT] == ["no_decay", "decay"]
    assert all(isinstance(s, tg.Selector) for s, _ in tg.presets.DEFAULT + tg.presets.TIMM + tg.presets.HF)


def test_adamw_with_decay_mask_equals_adamw_with_a_hand_written_mask(params):
    hand = jtu.tree_map(lambda p: p.ndim >= 2, params)
    hand = eqx.tree_at(lambda m: m.embed.weight, hand, False)
    grads = jtu.tree_map(lambda p: jnp.cos(3 * p + 1), params)

    def run(mask):
        tx = optax.adamw(0.1, weight_decay=0.5, mask=mask)

        @jax.jit
        def steps(params):
            state = tx.init(params)
            for _ in range(3):
                updates, state = tx.update(grads, state, params)
                params = optax.apply_updates(params, updates)
            return params

        return steps(params)

    ours = run(tg.decay_mask(tg.presets.DEFAULT))
    ref = run(hand)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    # ... and the mask does change something: without it every matrix and vector decays.
    plain = run(None)
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True)
    )


def test_decay_mask_needs_the_decay_label():
    with pytest.raises(ValueError, match=r"no rule has the label 'decay'.*\['wd', 'no_wd'\]"):
        tg.decay_mask([("*.w", "wd"), ("**", "no_wd")])


# ----------------------------------------------------------------------------
# Freezing


def state_bytes(state):
    return sum(x.nbytes for x in jax.tree.leaves(state))


def test_frozen_body_holds_adam_state_only_for_trainable_leaves(params):
    trainable = tg.mask(params, "head")
    tx = tg.freeze(optax.adam(1e-2), ~tg.glob("head"))
    state = tx.init(params)
    head_bytes = params.head.weight.nbytes + params.head.bias.nbytes
    count = np.dtype(np.int32).itemsize
    assert state_bytes(state) == 2 * head_bytes + count
    assert state_bytes(optax.adam(1e-2).init(params)) == 2 * state_bytes(params) + count

    grads = jtu.tree_map(lambda p: jnp.sin(p + 1), params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    # Reference: Adam on the trainable part alone, zeros elsewhere.
    train_part, _ = eqx.partition(grads, trainable)
    ref_updates, _ = jax.jit(optax.adam(1e-2).update)(train_part, optax.adam(1e-2).init(train_part))
    for keep, u in zip(jax.tree.leaves(trainable), jax.tree.leaves(updates), strict=True):
        if not keep:
            assert not np.any(u), "a frozen leaf moved"
    np.testing.assert_allclose(updates.head.weight, ref_updates.head.weight, rtol=1e-6)
    np.testing.assert_allclose(updates.head.bias, ref_updates.head.bias, rtol=1e-6)


class LoRALinear(eqx.Module):
    base: eqx.nn.Linear
    lora_a: jax.Array
    lora_b: jax.Array

    def __init__(self, n, rank, *, key):
        k1, k2 = jax.random.split(key)
        self.base = eqx.nn.Linear(n, n, key=k1)
        self.lora_a = 0.01 * jax.random.normal(k2, (rank, n))
        self.lora_b = jnp.zeros((n, rank))

    def __call__(self, x):
        return self.base(x) + self.lora_b @ (self.lora_a @ x)


def test_lora_trains_only_the_adapters_under_jit():
    model = [LoRALinear(8, 2, key=k) for k in jax.random.split(jax.random.key(1), 3)]
    params, static = eqx.partition(model, eqx.is_array)
    tx = tg.freeze(optax.adam(1e-2), ~tg.glob("lora_{a,b}"))
    state = tx.init(params)
    adapters = sum(m.lora_a.nbytes + m.lora_b.nbytes for m in params)
    assert state_bytes(state) == 2 * adapters + 4

    x = jnp.ones((4, 8))

    @jax.jit
    def step(params, state):
        def loss(p):
            net = eqx.combine(p, static)
            h = x
            for layer in net:
                h = jax.vmap(layer)(h)
            return jnp.sum(h**2)

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new, _ = step(params, state)
    for old_layer, new_layer in zip(params, new, strict=True):
        np.testing.assert_array_equal(old_layer.base.weight, new_layer.base.weight)
        np.testing.assert_array_equal(old_layer.base.bias, new_layer.base.bias)
        assert not np.array_equal(old_layer.lora_b, new_layer.lora_b)


def test_freeze_catches_a_typo_in_the_adapter_name():
    params = {"base": jnp.ones(2), "lora_a": jnp.ones(2)}
    with pytest.raises(tg.NoMatchError, match=r"negated.*glob\('lroa\*'\).*\n.*lora_a"):
        tg.freeze(optax.adam(1e-2), ~tg.glob("lroa*")).init(params)


# ----------------------------------------------------------------------------
# Layer-wise learning-rate decay: timm's lr_scale for a ViT, written out

VIT_BLOCK = {
    "norm1.weight": (768,),
    "norm1.bias": (768,),
    "attn.qkv.weight": (2304, 768),
    "attn.qkv.bias": (2304,),
    "attn.proj.weight": (768, 768),
    "attn.proj.bias": (768,),
    "norm2.weight": (768,),
    "norm2.bias": (768,),
    "mlp.fc1.weight": (3072, 768),
    "mlp.fc1.bias": (3072,),
    "mlp.fc2.weight": (768, 3072),
    "mlp.fc2.bias": (768,),
}


def vit_table(depth):
    """timm vit_base_patch16_224's named_parameters (with `depth` blocks)."""
    table = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
    }
    for i in range(depth):
        table |= {f"blocks.{i}.{k}": v for k, v in VIT_BLOCK.items()}
    table |= {"norm.weight": (768,), "norm.bias": (768,), "head.weight": (1000, 768), "head.bias": (1000,)}
    return table


def nested(table):
    tree = {}
    for name, shape in table.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tree


def timm_lr_scales(names, layer_decay):
    """timm: group_parameters(model, vit.group_matcher(), reverse=True), then param_groups_layer_decay."""
    matcher = [
        (re.compile(r"^cls_token|pos_embed|patch_embed"), (0,), None),
        (re.compile(r"^blocks\.(\d+)"), (1,), None),
        (re.compile(r"^norm"), (1,), (99999,)),
    ]

    def ordinal(name):
        for regex, prefix, suffix in matcher:
            m = regex.match(name)
            if m:
                return tuple(map(float, [*prefix, *m.groups(), *(suffix or ())]))
        return (float("inf"),)

    grouping = {}
    for n in names:
        grouping.setdefault(ordinal(n), []).append(n)
    layer_map, lid = {}, -1
    for k in sorted(grouping):
        if lid < 0 or k[-1] != 99999:
            lid += 1
        for n in grouping[k]:
            layer_map[n] = lid
    num_layers = max(layer_map.values()) + 1
    layer_max = num_layers - 1
    layer_scales = [layer_decay ** (layer_max - i) for i in range(num_layers)]
    return {n: layer_scales[layer_map.get(n, layer_max)] for n in names}


@pytest.mark.parametrize("depth, decay", [(12, 0.75), (24, 0.65), (3, 0.9)])
def test_layer_decay_scales_reproduce_timm_exactly(depth, decay):
    table = vit_table(depth)
    tree = nested(table)
    ours = dict(zip(tg.paths(tree), jax.tree.leaves(tg.layer_decay_scales(tree, decay)), strict=True))
    assert ours == timm_lr_scales(list(table), decay)  # exact float equality
    assert ours["head.weight"] == 1.0 and ours["norm.bias"] == decay
    assert ours["cls_token"] == decay ** (depth + 1)


def test_layer_ids_of_a_vit():
    tree = nested(vit_table(12))
    ids = dict(zip(tg.paths(tree), jax.tree.leaves(tg.layer_ids(tree)), strict=True))
    assert ids["pos_embed"] == 0 and ids["patch_embed.proj.bias"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.11.mlp.fc2.bias"] == 12
    assert ids["norm.weight"] == 12 and ids["head.bias"] == 13


def test_layer_decay_is_one_transform_and_matches_per_layer_learning_rates(params):
    lr, decay = 0.05, 0.5
    rules = [("embed", 0), ("ln_f", -2)]
    scales = tg.layer_decay_scales(params, decay, rules=rules)
    assert scales.embed.weight == decay**3 and scales.blocks[0].ln1.weight == decay**2
    assert scales.ln_f.bias == decay and scales.head.weight == 1.0

    tx = optax.chain(optax.adamw(lr, weight_decay=0.1), tg.layer_decay(decay, rules=rules))
    state = tx.init(params)
    assert state_bytes(state) == state_bytes(optax.adamw(lr, weight_decay=0.1).init(params))
    grads = jtu.tree_map(lambda p: jnp.cos(p), params)
    updates, _ = jax.jit(tx.update)(grads, state, params)

    # Reference: one AdamW per leaf with learning rate lr * scale (PyTorch-style param groups).
    for u, g, p, s in zip(*(jax.tree.leaves(t) for t in (updates, grads, params, scales)), strict=True):
        ref_tx = optax.adamw(lr * s, weight_decay=0.1)
        ref, _ = ref_tx.update(g, ref_tx.init(p), p)
        np.testing.assert_allclose(u, ref, rtol=1e-6, atol=1e-9)


def test_layer_decay_errors(params):
    with pytest.raises(tg.NoMatchError, match=r"blocks='block' names no subtree.*Close matches: blocks"):
        tg.layer_ids(params, blocks="block")
    with pytest.raises(
        ValueError, match=r"layer id of rule 0 \(label 7\) is 7; with 2 blocks it must be an int from 0"
    ):
        tg.layer_ids(params, rules=[("embed", 7)])
    with pytest.raises(ValueError, match=r"index after 'blocks', but blocks.a has 'a' there"):
        tg.layer_ids({"blocks": {"0": {"x": 1}, "a": 2}}, rules=[])
    with pytest.raises(ValueError, match="decay must be a positive number"):
        tg.layer_decay(0)
    with pytest.raises(tg.NoMatchError, match=r"rule 0 .*glob\('embd'\)"):
        tg.layer_ids(params, rules=[("embd", 0)])


# ----------------------------------------------------------------------------
# scale_by_rules


def test_scale_by_rules_matches_hand_scaled_sgd(params):
    tx = optax.chain(optax.sgd(0.1), tg.scale_by_rules([("blocks.0", 0.5), ("head", 0.0)], default=2.0))
    grads = jtu.tree_map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params))
    for path, u in zip(tg.paths(params), jax.tree.leaves(updates), strict=True):
        factor = 0.5 if path.startswith("blocks.0.") else 0.0 if path.startswith("head.") else 2.0
        np.testing.assert_array_equal(u, np.full(u.shape, -0.1 * factor, np.float32))


def test_scale_by_rules_rejects_non_numeric_factors():
    with pytest.raises(TypeError, match=r"factor of rule 0 \(label 'x'\) is 'x'"):
        tg.scale_by_rules([("a", "x")])


# ----------------------------------------------------------------------------
# Schedules per rule, weight-decay rates, gradual unfreezing: against hand-written
# per-group optimizers, several steps under jit


def run_steps(tx, params, grads, steps=4):
    """The updates of `steps` jitted steps of `tx` with fixed gradients, params applied."""

    @jax.jit
    def go(params):
        state, out = tx.init(params), []
        for _ in range(steps):
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            out.append(updates)
        return out

    return go(params)


def assert_same(ours, reference, rtol=1e-6):
    for a, b in zip(ours, reference, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-9)


def group_labels(params, rules, default):
    """The labels as optax.partition takes them for an Equinox tree (a tree of labels shaped
    like a module is callable, and optax would call it)."""
    labels = tg.labels(params, rules, default=default)
    return lambda _: labels


WARMUP = optax.linear_schedule(0.0, 1.0, transition_steps=3)
DECAY = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.5)


def test_schedules_per_rule_equal_a_per_group_chain(params):
    grads = jtu.tree_map(jnp.cos, params)
    rules = [("head", WARMUP), ("blocks.0", DECAY), ("embed", 0.5)]
    ours = run_steps(optax.chain(optax.adam(0.1), tg.scale_by_rules(rules)), params, grads)
    # Reference: one optimizer per group, each scaled by its own schedule (optax.scale_by_schedule).
    reference = optax.partition(
        {
            "head": optax.chain(optax.adam(0.1), optax.scale_by_schedule(WARMUP)),
            "block0": optax.chain(optax.adam(0.1), optax.scale_by_schedule(DECAY)),
            "embed": optax.chain(optax.adam(0.1), optax.scale(0.5)),
            "rest": optax.adam(0.1),
        },
        group_labels(params, [("head", "head"), ("blocks.0", "block0"), ("embed", "embed")], "rest"),
    )
    assert_same(ours, run_steps(reference, params, grads))
    # The head starts at zero: its first update is exactly 0.
    assert not np.any(ours[0].head.weight) and np.all(ours[1].head.weight != 0)


def test_only_schedules_need_a_count(params):
    assert tg.scale_by_rules([("head", 0.5)]).init(params) == optax.EmptyState()
    state = tg.scale_by_rules([("head", WARMUP)]).init(params)
    assert isinstance(state, optax.ScaleByScheduleState) and int(state.count) == 0


def test_layer_decay_under_a_schedule_equals_the_scales_times_the_schedule(params):
    grads = jtu.tree_map(jnp.cos, params)
    rules = [("embed", 0), ("ln_f", -2)]
    ours = optax.chain(optax.sgd(0.1), tg.layer_decay(0.5, rules=rules, schedule=WARMUP))
    reference = optax.chain(optax.sgd(0.1), tg.layer_decay(0.5, rules=rules), optax.scale_by_schedule(WARMUP))
    assert_same(run_steps(ours, params, grads), run_steps(reference, params, grads))
    with pytest.raises(TypeError, match=r"The schedule of layer_decay\(\) is 'fast'"):
        tg.layer_decay(0.5, schedule="fast")


def test_weight_decay_rates_equal_a_per_group_adamw(params):
    grads = jtu.tree_map(jnp.cos, params)
    rates = [("embed", 0.01), (tg.ndim >= 2, 0.1)]
    ours = optax.chain(optax.scale_by_adam(), tg.weight_decay(rates), optax.scale_by_learning_rate(0.05))
    # Reference: PyTorch-style parameter groups, one AdamW per rate.
    reference = optax.partition(
        {rate: optax.adamw(0.05, weight_decay=rate) for rate in (0.01, 0.1, 0.0)},
        group_labels(params, rates, 0.0),
    )
    assert_same(run_steps(ours, params, grads), run_steps(reference, params, grads))


def test_weight_decay_from_a_preset_is_adamw_with_its_mask(params):
    grads = jtu.tree_map(jnp.cos, params)
    rates = tg.relabel(tg.presets.DEFAULT, {"decay": 0.1, "no_decay": 0.0})
    ours = optax.chain(optax.scale_by_adam(), tg.weight_decay(rates), optax.scale_by_learning_rate(0.05))
    reference = optax.adamw(0.05, weight_decay=0.1, mask=tg.decay_mask())
    assert_same(run_steps(ours, params, grads), run_steps(reference, params, grads))


def test_weight_decay_under_a_schedule(params):
    grads = jtu.tree_map(jnp.cos, params)
    ours = run_steps(tg.weight_decay([("head", DECAY)]), params, grads, steps=3)
    # By hand: update = grad + rate(t) * param, the params moving by the updates.
    p = params
    for t, updates in enumerate(ours):
        expected = grads.head.weight + DECAY(t) * p.head.weight
        np.testing.assert_allclose(updates.head.weight, expected, rtol=1e-6)
        np.testing.assert_array_equal(updates.embed.weight, grads.embed.weight)
        p = optax.apply_updates(p, updates)


def test_weight_decay_needs_the_params(params):
    tx = tg.weight_decay([("head", 0.1)])
    with pytest.raises(ValueError, match=r"weight_decay\(\) needs the params: pass them to update\(\)"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: tg.weight_decay([("head", "lots")]),
            TypeError,
            r"rate of rule 0 \(label 'lots'\) is 'lots'",
        ),
        (lambda: tg.weight_decay([("head", 0.1)], default=True), TypeError, r"rate of default is True"),
        (lambda: tg.scale_by_rules([("head", tg.ndim)]), TypeError, r"factor of rule 0 .* a schedule"),
        (
            lambda: tg.relabel(tg.presets.NANOGPT, {"decay": 0.1}),
            ValueError,
            r"labels without a value: \['no_decay'\]",
        ),
        (
            lambda: tg.relabel(tg.presets.NANOGPT, {"decay": 0.1, "no_decay": 0, "nodecay": 0}),
            ValueError,
            r"keys no rule has as its label: \['nodecay'\]",
        ),
        (lambda: tg.gradual_unfreeze(optax.sgd(1.0), [("head", -1)]), TypeError, r"ints from 0, or math.inf"),
        (
            lambda: tg.gradual_unfreeze(optax.sgd(1.0), [("head", 1.5)]),
            TypeError,
            r"label of rule 0 \(label 1.5\)",
        ),
    ],
)
def test_bad_rates_factors_and_steps(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_gradual_unfreezing_gives_exact_zeros_until_each_step(params):
    grads = jtu.tree_map(jnp.cos, params)
    rules = [("head", 0), ("blocks.1", 2), ("blocks.0", 3), ("embed", float("inf"))]
    ours = run_steps(tg.gradual_unfreeze(optax.adam(0.1), rules, default=1), params, grads, steps=5)
    # Reference: Adam on everything, each group's update kept from its step on.
    starts = tg.labels(params, rules, default=1)
    adam = run_steps(optax.adam(0.1), params, grads, steps=5)
    for t, (u, a) in enumerate(zip(ours, adam, strict=True)):
        expected = jtu.tree_map(lambda x, s, t=t: x if t >= s else jnp.zeros_like(x), a, starts)
        assert_same([u], [expected])
        for path, leaf, start in zip(tg.paths(u), jax.tree.leaves(u), jax.tree.leaves(starts), strict=True):
            assert np.all(leaf == 0) == (t < start), (t, path)
            assert not np.any(np.signbit(leaf)) or t >= start  # +0.0, not -0.0


def test_gradual_unfreezing_keeps_state_for_every_leaf_from_the_start(params):
    adam_state = state_bytes(optax.adam(0.1).init(params))
    unfreeze = tg.gradual_unfreeze(optax.adam(0.1), [("head", 0)], default=100)
    frozen = tg.freeze(optax.adam(0.1), ~tg.glob("head"))
    # The whole of Adam's state plus one step count; freeze keeps state for the head alone.
    assert state_bytes(unfreeze.init(params)) == adam_state + 4
    head = params.head.weight.nbytes + params.head.bias.nbytes
    assert state_bytes(frozen.init(params)) == 2 * head + 4


@pytest.mark.parametrize(
    "mapping, problems",
    [
        ({"a": 1}, "labels without a value: ['no_decay', 'decay']; keys no rule has as its label: ['a']"),
        ({"decay": 1, "no_decay": 2, "zzz": 3}, "keys no rule has as its label: ['zzz']"),
        ({"decay": 1}, "labels without a value: ['no_decay']"),
    ],
)
def test_relabel_names_every_disagreement(mapping, problems):
    message = (
        f"relabel(): the mapping and the rules' labels disagree: {problems}. The rules' labels are "
        "['no_decay', 'decay']; give each exactly one value (check the spelling)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tg.relabel(tg.presets.DEFAULT, mapping)
    with pytest.raises(TypeError, match=r"^relabel\(\) maps labels with a dict \{label: value\}, got str\.$"):
        tg.relabel(tg.presets.DEFAULT, "x")


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: tg.scale_by_rules([("w", "0.5")]),
            "The factor of rule 0 (label '0.5') is '0.5'; give a real number or a schedule (a function of "
            "the step count, e.g. optax.linear_schedule(0.0, 1.0, 100)).",
        ),
        (
            lambda: tg.Treatment(learning_rate="1e-3"),
            "The learning_rate of Treatment() is '1e-3'; give a real number or a schedule (a function of "
            "the step count, e.g. optax.linear_schedule(0.0, 1.0, 100)).",
        ),
    ],
)
def test_a_factor_that_is_neither_a_number_nor_a_schedule_is_refused(build, message):
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        build()


def test_the_default_exclusions_read_a_leaf_s_own_name_in_any_case():
    # A leaf that is itself a table or a token (a 3-D `pos_embed`, `cls_token`), or whose
    # module is a norm, in whatever case the model writes it.
    tree = {
        "pos_embed": np.zeros((1, 4, 8)),
        "Pos_Embedding": np.zeros((1, 4, 8)),
        "cls_token": np.zeros((1, 1, 8)),
        "LN_F": {"w": np.zeros((4, 4))},
        "w": np.zeros((4, 4)),
    }
    assert tg.mask(tree, tg.presets.DEFAULT_NO_DECAY) == {
        "LN_F": {"w": True},
        "Pos_Embedding": True,
        "cls_token": True,
        "pos_embed": True,
        "w": False,
    }
