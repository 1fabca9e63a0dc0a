"""Ready-made rules: weight decay conventions, and the layer groupings of timm's families.

Every weight-decay preset is a plain list of `(selector, label)` rules, to
read, print and extend: rules put in front win (the first matching rule decides), e.g.
`[("^cls_token$", "no_decay"), *treeglob.presets.TIMM]`. The weight-decay
presets label every array leaf `"decay"` or `"no_decay"`; feed them to
`treeglob.decay_mask` (one AdamW, decay on the `"decay"` leaves) or to
`treeglob.multi_transform`. Their exclusion rule is one optional any-of, so
a preset may name parts a model lacks (no embedding, no norm) without
tripping the strictness check, while a typo in a rule you add still does.

The layer presets (`TIMM_*_LAYERS`) are `treeglob.LayerGroups(blocks, rules)`
for `treeglob.layer_decay(..., rules=...)`: where a family's blocks are and
where its other parts go; extend one with `LayerGroups(p.blocks, [rule, *p.rules])`.

Examples:
    >>> import numpy as np, treeglob
    >>> params = {"emb": {"weight": np.zeros((10, 4))}, "fc": {"weight": np.zeros((4, 4)), "bias": np.zeros(4)}}
    >>> treeglob.labels(params, treeglob.presets.NANOGPT)
    {'emb': {'weight': 'decay'}, 'fc': {'bias': 'no_decay', 'weight': 'decay'}}
    >>> treeglob.labels(params, [("emb", "no_decay"), *treeglob.presets.TIMM])
    {'emb': {'weight': 'no_decay'}, 'fc': {'bias': 'no_decay', 'weight': 'decay'}}
"""

from __future__ import annotations

import equinox as eqx

from ._core.conditions import glob, inside, ndim, regex
from ._core.selector import Selector, any_of, named, optional
from ._training.layers import JOIN_NEXT, LayerGroups

__all__ = [
    "BIG_VISION_VIT_LAYERS",
    "BY_NAME",
    "CONV_KERNELS",
    "DEFAULT",
    "DEFAULT_NO_DECAY",
    "EMBED_NAMES",
    "HF",
    "HF_NO_DECAY",
    "NANOGPT",
    "NORM_NAMES",
    "TIMM",
    "TIMM_NO_DECAY",
    "TIMM_BEIT_LAYERS",
    "TIMM_CONVNEXT_LAYERS",
    "TIMM_DEIT_LAYERS",
    "TIMM_RESNET_LAYERS",
    "TIMM_SWIN_LAYERS",
    "TIMM_VIT_LAYERS",
    "own_name",
]

#: Normalisation layers of Equinox, excluded from decay by type.
NORM_LAYERS = (eqx.nn.LayerNorm, eqx.nn.RMSNorm, eqx.nn.GroupNorm, eqx.nn.BatchNorm)

#: The names frameworks give normalisation layers: `norm`, `norm1`, `ln_f`,
#: `final_layer_norm`, `input_layernorm`, Linen's `LayerNorm_0`, Haiku's
#: `layer_norm`, `bn1`, ... (not `normal_head`, `denormalizer`).
NORM_NAMES = (
    "{norm,norm[0-9]*,*_norm,*_norm[0-9]*,norm_*,*layernorm*,*layer_norm*,*rmsnorm*,*rms_norm*,"
    "*groupnorm*,*group_norm*,*batchnorm*,*batch_norm*,ln,ln_*,ln[0-9]*,*_ln,bn,bn[0-9]*}"
)

#: The names of token and position tables and learned tokens: `wte`, `wpe`,
#: `embed_tokens`, `word_embeddings`, `pos_embed`, `cls_token`, Linen's
#: `Embed_0` / `embedding`, Haiku's `embed` / `embeddings`, and big_vision's
#: and DeiT's learned tokens `cls`, `reg`, `dist` (`reg_tokens`, `dist_token`).
EMBED_NAMES = (
    "{embed,embeds,embedding,embeddings,embed_*,*_embed,*_embeds,*_embedding,*_embeddings,wte,wpe,"
    "*_token,*_tokens,cls,reg,dist}"
)

#: What a name cannot say: a parameter with 4 or more dimensions is a
#: convolution kernel (a patch embedding such as big_vision's `embedding.kernel`),
#: never a token or position table, whose tables have at most 3 (`(1, N, D)`).
CONV_KERNELS = ndim >= 4


def own_name(names: str) -> Selector:
    """Leaves whose own name, or their module's (the segment before it), is one of `names`
    (a brace glob, case-insensitive): a norm named `ln_f` excludes `ln_f.scale`, but a
    layer inside a subtree that mentions a norm or an embedding (`time_embedding.linear_1.weight`)
    is judged by its own name."""
    return glob(names + "$", ignore_case=True) | glob(names + ".*$", ignore_case=True)


_EVERYTHING_ELSE = glob("**")

#: The usual exclusions: no decay for biases (`bias`, Haiku's `b`),
#: normalisation layers (by type and by their own name), embeddings and
#: learned tokens (by type and by their own name; not a patch-embedding
#: convolution, named `patch_embed*` or 4-D) and any parameter with at most
#: one dimension; decay for the rest.
DEFAULT_NO_DECAY = named(
    "presets.DEFAULT_NO_DECAY",
    optional(
        any_of(
            glob("{bias,b}$"),
            inside(*NORM_LAYERS),
            own_name(NORM_NAMES),
            inside(eqx.nn.Embedding),
            own_name(EMBED_NAMES) - optional(any_of(glob("patch_embed*"), CONV_KERNELS)),
            ndim <= 1,
        )
    ),
)
#: The usual exclusions as a rule list: `DEFAULT_NO_DECAY` (shown by that name in reports), then `decay`.
DEFAULT = [(DEFAULT_NO_DECAY, "no_decay"), (_EVERYTHING_ELSE, "decay")]

#: nanoGPT (`configure_optimizers`): decay every parameter with `ndim >= 2`.
NANOGPT = [
    (ndim >= 2, "decay"),
    (optional(ndim <= 1), "no_decay"),
]

#: timm `param_groups_weight_decay`: no decay for `ndim <= 1` and for names
#: ending in `.bias`. timm's `no_weight_decay_list` holds exact names: put
#: them in front, e.g. `[(treeglob.optional(["^pos_embed$", "^cls_token$"]), "no_decay"), *TIMM]`.
TIMM_NO_DECAY = named("presets.TIMM_NO_DECAY", optional(any_of(ndim <= 1, glob("*.bias$"))))
#: The rule list: `TIMM_NO_DECAY` (shown by that name in reports), then `decay`.
TIMM = [(TIMM_NO_DECAY, "no_decay"), (_EVERYTHING_ELSE, "decay")]

#: Hugging Face `Trainer.get_decay_parameter_names`: no decay inside
#: `LayerNorm` layers or for names that contain, in any case, `bias`,
#: `layernorm`, `rmsnorm`, a `norm` segment or a segment ending `_norm`.
#: Everything else decays, embeddings included. On trees without layer types
#: (Flax, Haiku, a checkpoint) the layer norms are found by their own name, as
#: HF's Flax examples do (`ln_1`, `ln_f`, `layer_norm`, `LayerNorm_0`), and
#: Haiku's bias `b` counts as a bias.
HF_NO_DECAY = named(
    "presets.HF_NO_DECAY",
    optional(
        any_of(
            inside(eqx.nn.LayerNorm),
            regex(r".*(bias|layernorm|rmsnorm|(^|\.)norm($|\.)|_norm($|\.)).*", ignore_case=True),
            own_name("{ln,ln_*,ln[0-9]*,*_ln,*layernorm*,*layer_norm*}"),
            glob("b$"),
        )
    ),
)
#: The rule list: `HF_NO_DECAY` (shown by that name in reports), then `decay`.
HF = [(HF_NO_DECAY, "no_decay"), (_EVERYTHING_ELSE, "decay")]

# ----------------------------------------------------------------------------
# Layer groupings for `treeglob.layer_decay`, transcribed from the `group_matcher`
# of each timm family (timm 1.0.x): the stem is layer 0, each block one layer in
# order, and what no rule places (the head, `fc_norm`) the top. Every rule is
# optional, so a model lacking a part (no `pos_embed`, no final `norm`) still fits.

#: ViT (`vision_transformer.py`): class/register tokens and the position and
#: patch embeddings are the stem; the final `norm` joins the last block.
TIMM_VIT_LAYERS = LayerGroups(
    "blocks",
    [
        (optional(glob("^{cls_token,pos_embed,patch_embed,dist_token,reg_token}")), 0),
        (optional(glob("^norm")), -2),
    ],
)

#: DeiT (`deit.py`), distilled or not: the ViT grouping, the distillation token in the stem.
TIMM_DEIT_LAYERS = TIMM_VIT_LAYERS

#: BEiT (`beit.py`): the stem also holds a shared relative position bias; a
#: model with mean pooling has `fc_norm` (the top) instead of a final `norm`.
TIMM_BEIT_LAYERS = LayerGroups(
    "blocks",
    [
        (optional(glob("^{cls_token,pos_embed,patch_embed,rel_pos_bias}")), 0),
        (optional(glob("^norm")), -2),
    ],
)

#: ConvNeXt (`convnext.py`): blocks numbered over the stages; a stage's
#: `downsample` joins that stage's first block, `norm_pre` the last block.
TIMM_CONVNEXT_LAYERS = LayerGroups(
    "stages.*.blocks.*",
    [
        (optional(glob("^stem")), 0),
        (optional(glob("^stages.*.downsample")), JOIN_NEXT),
        (optional(glob("^norm_pre")), -2),
    ],
)

#: Swin (`swin_transformer.py`): blocks numbered over `layers`; a stage's
#: patch-merging `downsample` joins its first block, the final `norm` the last.
TIMM_SWIN_LAYERS = LayerGroups(
    "layers.*.blocks.*",
    [
        (optional(glob("^{patch_embed,absolute_pos_embed}")), 0),
        (optional(glob("^layers.*.downsample")), JOIN_NEXT),
        (optional(glob("^norm")), -2),
    ],
)

#: ResNet (`resnet.py`): `conv1` / `bn1` are the stem, each bottleneck of
#: `layer1` ... `layer4` one layer, `fc` the top.
TIMM_RESNET_LAYERS = LayerGroups("layer{1..4}.*", [(optional(glob("^{conv1,bn1}")), 0)])

#: big_vision's ViT (Flax Linen, `models/vit.py`) by its names: the patch
#: embedding `embedding`, the `cls` token and `Transformer.posembed_input` are
#: the stem, blocks `Transformer.encoderblock_N` numbered by N, and
#: `Transformer.encoder_norm` joins the last block, as timm's final `norm`.
BIG_VISION_VIT_LAYERS = LayerGroups(
    "Transformer.encoderblock_*",
    [
        (optional(glob("^{embedding,cls,reg,pos_embedding}") | glob("^Transformer.posembed_input")), 0),
        (optional(glob("^Transformer.encoder_norm")), -2),
    ],
)

#: The weight-decay presets by the names the command line and rules files use.
BY_NAME = {"default": DEFAULT, "nanogpt": NANOGPT, "timm": TIMM, "hf": HF}
