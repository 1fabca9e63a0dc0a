"""Layer-wise LR decay for every timm family, against a transcription of timm itself.

The name/shape tables are written from timm's model definitions (timm 1.0.x,
`vision_transformer.py`, `deit.py`, `beit.py`, `convnext.py`,
`swin_transformer.py`, `resnet.py`), and `timm_lr_scales` transcribes
`timm.models._manipulate.group_with_matcher(..., reverse=True)` and
`timm.optim._param_groups.param_groups_layer_decay` of timm 1.0.29 with each
family's `group_matcher(coarse=False)`.
"""

import re
from collections import OrderedDict, defaultdict
from itertools import chain

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import treeglob as tg

MATCH_PREV_GROUP = (99999,)


def timm_layer_map(names, group_matcher):
    """group_with_matcher(named_parameters, group_matcher, reverse=True)."""
    compiled = []
    for group_ordinal, (_, mspec) in enumerate(group_matcher.items()):
        if mspec is None:
            continue
        if isinstance(mspec, tuple | list):
            for sspec in mspec:
                compiled += [(re.compile(sspec[0]), (group_ordinal,), sspec[1])]
        else:
            compiled += [(re.compile(mspec), (group_ordinal,), None)]

    def get_grouping(name):
        for match_fn, prefix, suffix in compiled:
            r = match_fn.match(name)
            if r:
                parts = (prefix, r.groups(), suffix)
                return tuple(map(float, chain.from_iterable(filter(None, parts))))
        return (float("inf"),)

    grouping = defaultdict(list)
    for name in names:
        grouping[get_grouping(name)].append(name)
    layer_id_to_param, lid = defaultdict(list), -1
    for k in sorted(grouping):
        if lid < 0 or k[-1] != MATCH_PREV_GROUP[0]:
            lid += 1
        layer_id_to_param[lid].extend(grouping[k])
    return {n: lid for lid, members in layer_id_to_param.items() for n in members}


def timm_lr_scales(names, group_matcher, layer_decay, min_scale=0.0):
    """The lr_scale of each parameter in param_groups_layer_decay."""
    layer_map = timm_layer_map(names, group_matcher)
    num_layers = max(layer_map.values()) + 1
    layer_max = num_layers - 1
    layer_scales = [max(min_scale, layer_decay ** (layer_max - i)) for i in range(num_layers)]
    return {n: layer_scales[layer_map.get(n, layer_max)] for n in names}


# ----------------------------------------------------------------------------
# group_matcher(coarse=False) of each family, as in timm


VIT_MATCHER = dict(
    stem=r"^cls_token|reg_token|pos_embed|patch_embed",
    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
)
DEIT_MATCHER = dict(
    stem=r"^cls_token|pos_embed|patch_embed|dist_token",
    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
)
BEIT_MATCHER = dict(
    stem=r"^cls_token|pos_embed|patch_embed|rel_pos_bias",
    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
)
CONVNEXT_MATCHER = dict(
    stem=r"^stem",
    blocks=[
        (r"^stages\.(\d+)\.downsample", (0,)),
        (r"^stages\.(\d+)\.blocks\.(\d+)", None),
        (r"^norm_pre", (99999,)),
    ],
)
SWIN_MATCHER = dict(
    stem=r"^patch_embed",
    blocks=[
        (r"^layers\.(\d+).downsample", (0,)),
        (r"^layers\.(\d+)\.\w+\.(\d+)", None),
        (r"^norm", (99999,)),
    ],
)
RESNET_MATCHER = dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)\.(\d+)")


# ----------------------------------------------------------------------------
# named_parameters (names and shapes) of each model


def _linear(prefix, out, inp, bias=True):
    return {f"{prefix}.weight": (out, inp)} | ({f"{prefix}.bias": (out,)} if bias else {})


def _norm(prefix, dim):
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _vit_block(prefix, dim=768):
    return (
        _norm(f"{prefix}.norm1", dim)
        | _linear(f"{prefix}.attn.qkv", 3 * dim, dim)
        | _linear(f"{prefix}.attn.proj", dim, dim)
        | _norm(f"{prefix}.norm2", dim)
        | _linear(f"{prefix}.mlp.fc1", 4 * dim, dim)
        | _linear(f"{prefix}.mlp.fc2", dim, 4 * dim)
    )


def vit_base_patch16_224():
    table = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "patch_embed.proj.weight": (768, 3, 16, 16),
    }
    table |= {"patch_embed.proj.bias": (768,)}
    for i in range(12):
        table |= _vit_block(f"blocks.{i}")
    return table | _norm("norm", 768) | _linear("head", 1000, 768)


def deit_base_distilled_patch16_224():
    table = {"cls_token": (1, 1, 768), "pos_embed": (1, 198, 768), "dist_token": (1, 1, 768)}
    table |= {"patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,)}
    for i in range(12):
        table |= _vit_block(f"blocks.{i}")
    return table | _norm("norm", 768) | _linear("head", 1000, 768) | _linear("head_dist", 1000, 768)


def beit_base_patch16_224():
    # No absolute position embedding, per-block relative position bias, layer scale
    # (gamma_1, gamma_2), q/v biases, and mean pooling: fc_norm, no final norm.
    table = {
        "cls_token": (1, 1, 768),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
    }
    for i in range(12):
        p = f"blocks.{i}"
        table |= {f"{p}.gamma_1": (768,), f"{p}.gamma_2": (768,)} | _norm(f"{p}.norm1", 768)
        table |= {f"{p}.attn.q_bias": (768,), f"{p}.attn.v_bias": (768,)}
        table |= {
            f"{p}.attn.relative_position_bias_table": (27 * 27 + 3, 12),
            f"{p}.attn.qkv.weight": (2304, 768),
        }
        table |= _linear(f"{p}.attn.proj", 768, 768) | _norm(f"{p}.norm2", 768)
        table |= _linear(f"{p}.mlp.fc1", 3072, 768) | _linear(f"{p}.mlp.fc2", 768, 3072)
    return table | _norm("fc_norm", 768) | _linear("head", 1000, 768)


def convnext_tiny():
    dims, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    table = {"stem.0.weight": (96, 3, 4, 4), "stem.0.bias": (96,)} | _norm("stem.1", 96)
    for s, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
        if s:  # stage 0 keeps the stem's width and stride: its downsample is an Identity
            table |= _norm(f"stages.{s}.downsample.0", dims[s - 1])
            table |= {
                f"stages.{s}.downsample.1.weight": (dim, dims[s - 1], 2, 2),
                f"stages.{s}.downsample.1.bias": (dim,),
            }
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}"
            table |= {
                f"{p}.gamma": (dim,),
                f"{p}.conv_dw.weight": (dim, 1, 7, 7),
                f"{p}.conv_dw.bias": (dim,),
            }
            table |= (
                _norm(f"{p}.norm", dim)
                | _linear(f"{p}.mlp.fc1", 4 * dim, dim)
                | _linear(f"{p}.mlp.fc2", dim, 4 * dim)
            )
    return table | _norm("head.norm", 768) | _linear("head.fc", 1000, 768)


def swin_tiny_patch4_window7_224():
    dims, depths, heads = (96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24)
    table = {"patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.proj.bias": (96,)} | _norm(
        "patch_embed.norm", 96
    )
    for s, (dim, depth, head) in enumerate(zip(dims, depths, heads, strict=True)):
        if s:  # patch merging at the start of stages 1-3
            table |= _norm(f"layers.{s}.downsample.norm", 4 * dims[s - 1])
            table |= _linear(f"layers.{s}.downsample.reduction", dim, 4 * dims[s - 1], bias=False)
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}"
            table |= _norm(f"{p}.norm1", dim) | {f"{p}.attn.relative_position_bias_table": (13 * 13, head)}
            table |= _linear(f"{p}.attn.qkv", 3 * dim, dim) | _linear(f"{p}.attn.proj", dim, dim)
            table |= (
                _norm(f"{p}.norm2", dim)
                | _linear(f"{p}.mlp.fc1", 4 * dim, dim)
                | _linear(f"{p}.mlp.fc2", dim, 4 * dim)
            )
    return table | _norm("norm", 768) | _linear("head.fc", 1000, 768)


def resnet50():
    table = {"conv1.weight": (64, 3, 7, 7)} | _norm("bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            table |= {f"{p}.conv1.weight": (planes, inplanes, 1, 1)} | _norm(f"{p}.bn1", planes)
            table |= {f"{p}.conv2.weight": (planes, planes, 3, 3)} | _norm(f"{p}.bn2", planes)
            table |= {f"{p}.conv3.weight": (4 * planes, planes, 1, 1)} | _norm(f"{p}.bn3", 4 * planes)
            if b == 0:
                table |= {f"{p}.downsample.0.weight": (4 * planes, inplanes, 1, 1)} | _norm(
                    f"{p}.downsample.1", 4 * planes
                )
            inplanes = 4 * planes
    return table | _linear("fc", 1000, 2048)


def checkpoint(table):
    """The params as a checkpoint's flat dict {name: array metadata} (its names split into segments)."""
    return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in table.items()}


FAMILIES = {
    "vit_base_patch16_224": (vit_base_patch16_224, VIT_MATCHER, tg.presets.TIMM_VIT_LAYERS, 12),
    "deit_base_distilled_patch16_224": (
        deit_base_distilled_patch16_224,
        DEIT_MATCHER,
        tg.presets.TIMM_DEIT_LAYERS,
        12,
    ),
    "beit_base_patch16_224": (beit_base_patch16_224, BEIT_MATCHER, tg.presets.TIMM_BEIT_LAYERS, 12),
    "convnext_tiny": (convnext_tiny, CONVNEXT_MATCHER, tg.presets.TIMM_CONVNEXT_LAYERS, 18),
    "swin_tiny_patch4_window7_224": (
        swin_tiny_patch4_window7_224,
        SWIN_MATCHER,
        tg.presets.TIMM_SWIN_LAYERS,
        12,
    ),
    "resnet50": (resnet50, RESNET_MATCHER, tg.presets.TIMM_RESNET_LAYERS, 16),
}


@pytest.mark.parametrize("decay", [0.75, 0.65])
@pytest.mark.parametrize("family", FAMILIES)
def test_presets_reproduce_timm_exactly(family, decay):
    make, matcher, preset, num_blocks = FAMILIES[family]
    table = make()
    tree = checkpoint(table)
    ours = dict(
        zip(tg.paths(tree), jax.tree.leaves(tg.layer_decay_scales(tree, decay, rules=preset)), strict=True)
    )
    expected = timm_lr_scales(list(table), matcher, decay)
    assert ours == expected  # exact float equality, every parameter
    ids = dict(zip(tg.paths(tree), jax.tree.leaves(tg.layer_ids(tree, rules=preset)), strict=True))
    assert max(ids.values()) == num_blocks + 1 == max(timm_layer_map(list(table), matcher).values())


def test_stage_downsamples_join_their_stages_first_block():
    tree = checkpoint(convnext_tiny())
    ids = tg.layer_ids(tree, rules=tg.presets.TIMM_CONVNEXT_LAYERS)
    assert ids["stem.0.weight"] == 0
    assert ids["stages.1.downsample.1.weight"] == ids["stages.1.blocks.0.gamma"] == 4
    assert ids["stages.2.blocks.8.gamma"] == 3 + 3 + 9
    assert ids["stages.3.downsample.0.bias"] == 16
    assert ids["head.fc.weight"] == 19


def test_blocks_given_as_a_pattern_are_numbered_by_value_not_as_strings():
    tree = {"enc": {str(i): {"w": np.zeros(2)} for i in range(12)}, "head": np.zeros(2)}
    ids = tg.layer_ids(tree, blocks="enc.*", rules=[])
    assert [ids["enc"][str(i)]["w"] for i in range(12)] == list(range(1, 13))
    assert ids == tg.layer_ids(tree, blocks="enc", rules=[])  # the path form numbers by index


def test_join_previous_places_a_stage_norm_with_the_stages_last_block():
    tree = {
        "stages": [{"blocks": [0.0, 0.0], "norm": 0.0}, {"blocks": [0.0, 0.0, 0.0], "norm": 0.0}],
        "norm": 0.0,
        "head": 0.0,
    }
    ids = tg.layer_ids(
        tree,
        blocks="stages.*.blocks.*",
        rules=[("^stages.*.norm", tg.JOIN_PREVIOUS), ("^norm", tg.JOIN_PREVIOUS)],
    )
    assert ids["stages"][0]["norm"] == 2 and ids["stages"][1]["norm"] == 5 and ids["norm"] == 5
    assert ids["head"] == 6


def test_a_model_with_fc_norm_and_no_norm_works_with_the_default_rules():
    table = beit_base_patch16_224()
    scales = tg.layer_decay_scales(
        checkpoint(table), 0.75
    )  # TIMM_VIT_LAYERS: its final-norm rule is optional
    assert scales["fc_norm.weight"] == 1.0 and scales["cls_token"] == 0.75**13


def test_stacked_convnext_stage_blocks():
    stage = {"blocks": {"w": np.zeros((3, 4, 4)), "b": np.zeros((3, 4))}}
    tree = {"stem": np.zeros(2), "stages": [stage, {"downsample": np.zeros(2), **stage}], "head": np.zeros(2)}
    stacked = {"stages.0.blocks": 1, "stages.1.blocks": 1}
    ids = tg.layer_ids(tree, rules=tg.presets.TIMM_CONVNEXT_LAYERS, stacked=stacked)
    assert ids["stages"][0]["blocks"]["w"].ravel().tolist() == [1, 2, 3]
    assert ids["stages"][1]["blocks"]["b"].ravel().tolist() == [4, 5, 6]
    assert ids["stages"][1]["downsample"] == 4 and ids["head"] == 7


def test_layer_decay_transform_with_a_family_preset():
    tree = {
        "conv1": {"weight": jnp.ones(2)},
        "layer1": {"0": {"w": jnp.ones(2)}},
        "layer2": {"0": {"w": jnp.ones(2)}},
    }
    tree["fc"] = {"weight": jnp.ones(2)}
    tx = optax.chain(optax.sgd(1.0), tg.layer_decay(0.5, rules=tg.presets.TIMM_RESNET_LAYERS))
    updates, _ = tx.update(tree, tx.init(tree))
    assert jax.tree.map(lambda u: float(u[0]), updates) == {
        "conv1": {"weight": -0.125},
        "fc": {"weight": -1.0},
        "layer1": {"0": {"w": -0.25}},
        "layer2": {"0": {"w": -0.5}},
    }


def test_block_patterns_that_match_nothing_are_errors():
    with pytest.raises(
        tg.NoMatchError, match=r"blocks='stage.\*.blocks.\*' matches no subtree from the root of the tree"
    ):
        tg.layer_ids({"stages": [{"blocks": [0.0]}]}, blocks="stage.*.blocks.*", rules=[])
    with pytest.raises(ValueError, match=r"or treeglob.JOIN_NEXT / treeglob.JOIN_PREVIOUS"):
        tg.layer_ids({"blocks": [0.0], "x": 0.0}, rules=[("x", "next")])


def test_join_markers_keep_their_identity():
    import copy
    import pickle

    for marker in (tg.JOIN_NEXT, tg.JOIN_PREVIOUS):
        assert copy.deepcopy(marker) is marker
        assert pickle.loads(pickle.dumps(marker)) is marker
    assert repr(tg.JOIN_NEXT) == "treeglob.JOIN_NEXT"
    assert repr(tg.JOIN_PREVIOUS) == "treeglob.JOIN_PREVIOUS"


def _zeros():
    return np.zeros(1)


@pytest.mark.parametrize(
    "tree, blocks, expected",
    [
        # Numbers in keys order the blocks, not the keys' text: b9 before b10.
        ({"b10": _zeros(), "b9": _zeros(), "b1": _zeros()}, "b*", {"b1": 1, "b9": 2, "b10": 3}),
        # Several numbers in a key, compared in turn; and at each level of the path.
        ({"b1_2": _zeros(), "b1_10": _zeros(), "b0_5": _zeros()}, "b*", {"b0_5": 1, "b1_2": 2, "b1_10": 3}),
        (
            {"s1": {"b2": _zeros(), "b10": _zeros()}, "s0": {"b1": _zeros()}},
            "s*.b*",
            {"s0": {"b1": 1}, "s1": {"b2": 2, "b10": 3}},
        ),
        # Keys without a number keep their place in the tree; the anchors may be written.
        ({"x": _zeros(), "y": _zeros()}, "^*$", {"x": 1, "y": 2}),
        ({"x": {"b1": _zeros()}, "y": {"b0": _zeros()}}, "*.b*", {"x": {"b1": 1}, "y": {"b0": 2}}),
        ({"blocks": {"b1": _zeros(), "b0": _zeros()}}, "^blocks.b*$", {"blocks": {"b0": 1, "b1": 2}}),
    ],
)
def test_blocks_are_numbered_by_the_numbers_in_their_keys(tree, blocks, expected):
    assert jax.tree.map(int, tg.layer_ids(tree, blocks=blocks, rules=[])) == expected


@pytest.mark.parametrize(
    "tree, blocks, problem, listed",
    [
        ({"enc_0": _zeros(), "dec_0": _zeros()}, "*", "numbered keys of different names", "dec_0, enc_0"),
        ({"b01": _zeros(), "b1": _zeros()}, "b*", "the same numbers in different keys", "b01, b1"),
        ({"b1": _zeros(), "bx": _zeros()}, "b*", "keys with and without a number", "b1, bx"),
        ({"s": {"b1": _zeros(), "bx": _zeros()}}, "s.b*", "keys with and without a number", "s.b1, s.bx"),
    ],
)
def test_blocks_whose_order_the_keys_do_not_say_are_refused(tree, blocks, problem, listed):
    message = (
        f"blocks={blocks!r}: the order of the blocks is ambiguous ({problem}): {listed}. Blocks are numbered "
        "by the numbers in their keys; narrow the pattern to the numbered blocks (e.g. 'encoder.layer_*'), "
        "or place the others with rules."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tg.layer_ids(tree, blocks=blocks, rules=[])


def test_a_blocks_pattern_that_matches_no_subtree_says_where_it_is_anchored():
    message = (
        "blocks='q*' matches no subtree from the root of the tree: blocks= is anchored at the root, a path to "
        "where the blocks are. Give a pattern whose matches are the blocks themselves (e.g. 'stages.*.blocks.*' "
        "or 'layer{1..4}.*'), or the path of the block sequence."
    )
    with pytest.raises(tg.NoMatchError, match=f"^{re.escape(message)}$"):
        tg.layer_ids({"blocks": {"b1": _zeros()}}, blocks="q*", rules=[])


def test_a_block_whose_keys_are_not_contiguous_is_one_block():
    # Path keys in insertion order (Haiku's style, penzai's LoRA labels): head.w stands
    # between the leaves of blocks.0, whose group then appears twice; it is still block 1.
    tree = OrderedDict([("blocks/0/w", 0), ("head/w", 0), ("blocks/0/b", 0), ("blocks/1/w", 0)])
    ids = tg.layer_ids(tree, blocks="blocks.*", rules=[])
    assert ids == OrderedDict([("blocks/0/w", 1), ("head/w", 3), ("blocks/0/b", 1), ("blocks/1/w", 2)])


def test_a_blocks_path_that_names_no_subtree_says_what_to_give():
    message = (
        "blocks='block' names no subtree of the tree. Close matches: blocks. Give the path of the block "
        "sequence as treeglob.paths() prints it, or a pattern for its blocks (e.g. 'stages.*.blocks.*'); for "
        "stacked blocks (eqx.filter_vmap, nnx.vmap, a penzai LayerStack, hk.layer_stack), also pass "
        "stacked={'<that path>': 1} (treeglob.stacked_layers(model) gives it where the model declares it)."
    )
    with pytest.raises(tg.NoMatchError, match=f"^{re.escape(message)}$"):
        tg.layer_ids({"blocks": [0, 0], "head": 0}, blocks="block")


@pytest.mark.parametrize("blocks", ["", 5, ("blocks",)])
def test_blocks_must_be_a_path_or_a_pattern(blocks):
    message = (
        "blocks must be the path of the block sequence (e.g. 'blocks', 'encoder.layers') or a pattern "
        "matching the blocks (e.g. 'stages.*.blocks.*')."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tg.layer_ids({"blocks": [0, 0], "head": 0}, blocks=blocks)


def test_stacked_blocks_are_found_in_types_from_too():
    params = {
        "blocks": {"w": jnp.ones((2, 3, 3)), "b": jnp.ones((2, 3))},
        "head": {"weight": jnp.ones((3, 3))},
    }
    ids = tg.layer_ids(params, stacked={"blocks": 1}, types_from=params)
    assert ids["head"] == {"weight": 3}
    assert ids["blocks"]["b"].tolist() == [[1], [2]] and ids["blocks"]["w"].tolist() == [[[1]], [[2]]]
