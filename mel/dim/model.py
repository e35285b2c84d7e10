r"""DIM's fusion head, read top to bottom.

Mention side (one token per feature, a missing image or cue is a masked token):

    [mention [SEP] sentence]  [mention]  [image]  [cue]        frozen encoder vectors
           |                      |          |        |
    Linear(d_i, d) + ReLU + LayerNorm + Dropout(0.4), one projection per feature (+ a feature-type embedding)
           \______________________|__________|________/
                 8-head self-attention over the tokens; missing ones are masked as keys
                 masked mean of the attended tokens (a masked token never reaches the output)
                 feed-forward block (d -> 2048 -> d, residual + LayerNorm)
                 Linear(d, out_dim)  ->  mention embedding

Entity side: `name [SEP] description` vector (+ the entity image when the KB has one), each
projected the same way, masked mean, Linear(d, out_dim)  ->  entity embedding.

    score = exp(logit_scale) * cos(mention, entity)  +  pair_mlp(pair features)
            + sum over visual groups g present for the pair:  w_g . x_g + b_g
            + w_prior . prior(mention, entity)   when the KB has a link prior (`mel.dim.prior`)
            + w_numbers . numbers(caption, entity)   regnal / title numbers (`mel.dim.name_numbers`)

The visual terms (beyond the paper; `mel.dim.pairs.VISUAL_GROUPS`) score what the photo says
about a candidate: the ConSE image vector against the entity text, the faces' apparent gender
against `Sex:`, apparent age against birth year and caption year, and the faces against the
entity image's faces. Each group is a linear term multiplied by its mask, so a masked group adds
exactly 0: a head with visual features and every visual mask off scores exactly as the same head
without them (tested). A head lists the groups it expects in `visual_feature_names`; older heads
(an empty list) have no visual terms and load unchanged.

The published code computes the attention and then sums the raw features; here the attention
output is what reaches the embedding. The pair-feature term goes beyond the paper: a small MLP
over cheap mention/name evidence (BM25 score, exact/alias match, token overlap, year
compatibility, raw encoder cosines; see `mel.dim.pairs`) that the cosine of two frozen-sentence
embeddings cannot express well, e.g. "Norris in 1976" vs a Norris born in 1990.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..training.common import check_number, check_whole
from .name_numbers import NUMBER_FEATURES
from .pairs import VISUAL_GROUPS, visual_columns
from .prior import PRIOR_FEATURES, prior_columns

# the order of the mention-side feature tokens (index = feature-type embedding row)
MENTION_FEATURES = ("context", "mention", "image", "cue")
ENTITY_FEATURES = ("text", "image")


@dataclass
class FusionConfig:
    text_dim: int = 384         # text encoder output (MiniLM 384, CLIP ViT-B/32 512)
    image_dim: int = 1280       # image encoder output (EfficientNet-Lite0 1280, CLIP 512)
    cue_dim: int = 384          # the cue is encoded with the text encoder
    d_model: int = 512          # DIM: 512
    n_heads: int = 8            # DIM: 8
    ffn_dim: int = 2048         # DIM: 2048
    out_dim: int = 512          # DIM: 512
    dropout: float = 0.4        # DIM: 0.4
    n_pair_features: int = 0    # 0 = the paper's head (cosine only)
    pair_hidden: int = 64
    init_logit_scale: float = math.log(20.0)
    text_encoder: str = ""      # the encoders the head was trained on; the linker checks them
    image_encoder: str = ""
    cue_provider: str = ""
    pair_feature_names: tuple[str, ...] | list[str] = ()
    visual_feature_names: tuple[str, ...] | list[str] = ()  # visual groups the head expects (() = none)
    prior_feature_names: tuple[str, ...] | list[str] = ()   # link-prior features the head uses (() = none)
    number_feature_names: tuple[str, ...] | list[str] = ()  # name-number features the head uses (() = none)

    def __post_init__(self):
        check_whole(self, text_dim=1, image_dim=1, cue_dim=1, d_model=1, n_heads=1, ffn_dim=1, out_dim=1,
                    n_pair_features=0, pair_hidden=1)
        check_number(self, dropout=(0.0, 0.99))
        if self.d_model % self.n_heads:
            raise InputError(f"d-model ({self.d_model}) must be divisible by n-heads ({self.n_heads}): "
                             f"each attention head gets d_model / n_heads dimensions")
        self.visual_feature_names = tuple(self.visual_feature_names)
        unknown = [g for g in self.visual_feature_names if g not in VISUAL_GROUPS]
        if unknown:
            raise InputError(f"unknown visual feature group(s) {unknown}; this version knows {list(VISUAL_GROUPS)}")
        self.prior_feature_names = tuple(self.prior_feature_names)
        unknown = [g for g in self.prior_feature_names if g not in PRIOR_FEATURES]
        if unknown or len(set(self.prior_feature_names)) < len(self.prior_feature_names):
            raise InputError(f"unknown or repeated link-prior feature(s) {list(self.prior_feature_names)}; this "
                             f"version knows {list(PRIOR_FEATURES)}")
        self.number_feature_names = tuple(self.number_feature_names)
        unknown = [g for g in self.number_feature_names if g not in NUMBER_FEATURES]
        if unknown or len(set(self.number_feature_names)) < len(self.number_feature_names):
            raise InputError(f"unknown or repeated name-number feature(s) {list(self.number_feature_names)}; this "
                             f"version knows {list(NUMBER_FEATURES)}")


class FeatureProjection(nn.Sequential):
    """DIM's per-feature block: Linear(d_i, d) + ReLU + LayerNorm + Dropout."""

    def __init__(self, in_dim: int, d: int, dropout: float):
        super().__init__(nn.Linear(in_dim, d), nn.ReLU(), nn.LayerNorm(d), nn.Dropout(dropout))


class MaskedMultiHeadAttention(nn.Module):
    """Multi-head self-attention whose keys can be masked per sample.

    Written out (instead of nn.MultiheadAttention) so that masking is exact on every code path:
    a masked key gets -inf before the softmax, i.e. weight exactly 0, so its values cannot leak.
    """

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d_model {d} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (b, t, d); valid (b, t) bool, True where the token exists. Every row needs one valid token."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = valid[:, None, None, :]  # (b, 1, 1, t): broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(b, t, d))


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens; masked_fill (not multiply) so a NaN in a masked slot cannot leak."""
    x = x.masked_fill(~valid[..., None], 0.0)
    return x.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)


class DimFusion(nn.Module):
    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = c = config
        dims = {"context": c.text_dim, "mention": c.text_dim, "image": c.image_dim, "cue": c.cue_dim}
        self.mention_proj = nn.ModuleDict({name: FeatureProjection(dims[name], c.d_model, c.dropout)
                                           for name in MENTION_FEATURES})
        self.feature_type = nn.Embedding(len(MENTION_FEATURES), c.d_model)
        self.attention = MaskedMultiHeadAttention(c.d_model, c.n_heads, c.dropout)
        self.attn_norm = nn.LayerNorm(c.d_model)
        self.ffn = nn.Sequential(nn.Linear(c.d_model, c.ffn_dim), nn.ReLU(), nn.Dropout(c.dropout),
                                 nn.Linear(c.ffn_dim, c.d_model))
        self.ffn_norm = nn.LayerNorm(c.d_model)
        self.mention_out = nn.Linear(c.d_model, c.out_dim)

        self.entity_proj = nn.ModuleDict({"text": FeatureProjection(c.text_dim, c.d_model, c.dropout),
                                          "image": FeatureProjection(c.image_dim, c.d_model, c.dropout)})
        self.entity_out = nn.Linear(c.d_model, c.out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.init_logit_scale)))
        if c.n_pair_features:
            self.pair_mlp = nn.Sequential(nn.Linear(c.n_pair_features, c.pair_hidden), nn.ReLU(),
                                          nn.Linear(c.pair_hidden, c.pair_hidden), nn.ReLU(),
                                          nn.Linear(c.pair_hidden, 1))
        else:
            self.pair_mlp = None
        # one linear term per visual group, zero at initialisation (a new head starts as the old one)
        self.visual = nn.ModuleDict({g: nn.Linear(len(VISUAL_GROUPS[g]), 1) for g in c.visual_feature_names})
        for layer in self.visual.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # the link-prior term (issue #15): one linear term over `prior_feature_names`, zero at initialisation
        self.prior = nn.Linear(len(c.prior_feature_names), 1) if c.prior_feature_names else None
        # the name-number term (issue #15): one linear term over `number_feature_names`, zero at initialisation
        self.numbers = nn.Linear(len(c.number_feature_names), 1) if c.number_feature_names else None
        for term in (self.prior, self.numbers):
            if term is not None:
                nn.init.zeros_(term.weight)
                nn.init.zeros_(term.bias)

    # -- the two towers ------------------------------------------------------------------------
    def encode_mentions(self, context: torch.Tensor, mention: torch.Tensor, image: torch.Tensor,
                        cue: torch.Tensor, image_mask: torch.Tensor, cue_mask: torch.Tensor) -> torch.Tensor:
        """(b, out_dim) L2-normalised. `image_mask` / `cue_mask` (b,) bool: True where present.

        A masked feature's values never reach the output (tested): it is a masked key, and the
        pooling skips it.
        """
        feats = {"context": context, "mention": mention, "image": image, "cue": cue}
        tokens = torch.stack([self.mention_proj[name](feats[name]) for name in MENTION_FEATURES], dim=1)
        tokens = tokens + self.feature_type.weight[None]
        always = torch.ones_like(image_mask, dtype=torch.bool)
        valid = torch.stack([always, always, image_mask.bool(), cue_mask.bool()], dim=1)
        # a masked token is also blanked: attention gives it weight 0, but 0 * NaN would still be NaN
        tokens = tokens.masked_fill(~valid[..., None], 0.0)
        x = self.attn_norm(tokens + self.attention(tokens, valid))
        pooled = masked_mean(x, valid)
        h = self.ffn_norm(pooled + self.ffn(pooled))
        return F.normalize(self.mention_out(h), dim=-1)

    def encode_entities(self, text: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """(n, out_dim) L2-normalised; entities without an image use their text alone.

        The masked mean of the text and image tokens, with the image projection run only for the
        rows that have an image (most KB entities have none, and it is the largest projection).
        """
        pooled = self.entity_proj["text"](text)
        has_image = image_mask.bool()
        if bool(has_image.any()):
            rows = has_image.nonzero().squeeze(1)
            image_tokens = self.entity_proj["image"](image[rows])
            pooled = pooled.index_add(0, rows, image_tokens) / (1.0 + has_image.to(pooled.dtype))[:, None]
        return F.normalize(self.entity_out(pooled), dim=-1)

    # -- scores --------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap keeps training stable

    def pair_scores(self, pair_features: torch.Tensor | None) -> torch.Tensor | float:
        if self.pair_mlp is None or pair_features is None:
            return 0.0
        return self.pair_mlp(pair_features).squeeze(-1)

    def visual_scores(self, visual: torch.Tensor | None, visual_mask: torch.Tensor | None) -> torch.Tensor | float:
        """visual (b, c, N_VISUAL_FEATURES), visual_mask (b, c, len(VISUAL_GROUPS)) bool -> (b, c) or 0.

        A group whose mask is False adds exactly 0 (masked_fill, so even a NaN value cannot leak)."""
        if not len(self.visual) or visual is None or visual_mask is None:
            return 0.0
        group_index = {g: i for i, g in enumerate(VISUAL_GROUPS)}
        total = torch.zeros(visual.shape[:2], dtype=visual.dtype, device=visual.device)
        for g, layer in self.visual.items():
            present = visual_mask[..., group_index[g]].bool()
            x = visual[..., visual_columns(g)].masked_fill(~present[..., None], 0.0)
            total = total + layer(x).squeeze(-1).masked_fill(~present, 0.0)
        return total

    def prior_scores(self, prior: torch.Tensor | None, prior_mask: torch.Tensor | None) -> torch.Tensor | float:
        """prior (b, c, N_PRIOR_FEATURES), prior_mask (b, c) bool -> (b, c) or 0. A masked pair (a KB without a
        link prior) adds exactly 0 (masked_fill, so a NaN cannot leak)."""
        if self.prior is None or prior is None or prior_mask is None:
            return 0.0
        present = prior_mask.bool()
        x = prior[..., prior_columns(self.config.prior_feature_names)].masked_fill(~present[..., None], 0.0)
        return self.prior(x).squeeze(-1).masked_fill(~present, 0.0)

    def number_scores(self, numbers: torch.Tensor | None) -> torch.Tensor | float:
        """numbers (b, c, N_NUMBER_FEATURES) -> (b, c) or 0. Every feature is 0 for a caption without numbers (and
        on padding) and the bias stays 0, so such a mention gets exactly 0."""
        if self.numbers is None or numbers is None:
            return 0.0
        names = self.config.number_feature_names
        return self.numbers(numbers[..., [NUMBER_FEATURES.index(n) for n in names]]).squeeze(-1)

    def score_candidates(self, mention_emb: torch.Tensor, entity_emb: torch.Tensor,
                         pair_features: torch.Tensor | None = None, visual: torch.Tensor | None = None,
                         visual_mask: torch.Tensor | None = None, prior: torch.Tensor | None = None,
                         prior_mask: torch.Tensor | None = None, numbers: torch.Tensor | None = None) -> torch.Tensor:
        """mention_emb (b, o), entity_emb (b, c, o), pair_features (b, c, f), optional visual
        features (b, c, v) with group masks (b, c, g), optional link-prior features (b, c, p) with their
        mask (b, c), optional name-number features (b, c, n) -> scores (b, c)."""
        cos = torch.einsum("bo,bco->bc", mention_emb, entity_emb)
        return (self.scale() * cos + self.pair_scores(pair_features) + self.visual_scores(visual, visual_mask)
                + self.prior_scores(prior, prior_mask) + self.number_scores(numbers))

    def in_batch_scores(self, mention_emb: torch.Tensor, entity_emb: torch.Tensor) -> torch.Tensor:
        """Every mention against every gold entity of the batch (b, b): the embedding part only."""
        return self.scale() * mention_emb @ entity_emb.T

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, path: str, extra: dict | None = None):
        """config.json (this FusionConfig + `extra` facts) and model.safetensors, published as one unit."""
        from ..training.checkpoint import save_pretrained_dir
        return save_pretrained_dir(self, self.config, path, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str) -> tuple["DimFusion", dict]:
        """The head saved in `path` and its config.json payload (dev scores, training facts)."""
        from ..training.checkpoint import load_pretrained_dir
        return load_pretrained_dir(cls, FusionConfig, path)
