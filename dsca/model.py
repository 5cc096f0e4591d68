"""The DSCA network: construction and forward.

``build_model(cfg)`` builds the reference study's network from the model keys of its YAML
config (``config_hier.yaml``); parameter names and shapes match the reference implementation,
so its checkpoints load with ``strict=True``.

Dual stream (``magnification: x5_x20``)::

    x20 [B,16N,D] --block conv, LN, ReLU--> [B*N,16,C] --CAPool(query = x5 Conv1d k1)--> [B,N,C]
    x5  [B,N,D]   --Conv1d k, LN-------------------------------------------------------> [B,N,C]
    (+ 2-D sin-cos position embedding of the patient grid on both)
    join post: Transformer per stream, then fuse (add | cat);  join pre: fuse, one Transformer
    -> pooling (gap | mean | max | max_mean) -> Linear + Sigmoid (hazards) or Cox MLP.

Single stream (``x5`` or ``x20``, the reference's ablations) keep the reference's generic
network names: ``patch_embedding_layer``, ``patch_encoder_layer``, ``pool``, ``out_layer``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from nystrom_attention import Nystromformer
from torch import Tensor, nn

from dsca.config.model import ModelConfig
from dsca.coords import BLOCK
from dsca.layers import (
    AvgPoolEmbedding,
    CAPoolEmbedding,
    Conv1dEmbedding,
    Dropout,
    GAPool,
    GAPoolEmbedding,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "DSCA",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "sincos_position_embedding",
]

log = logging.getLogger(__name__)

def sincos_position_embedding(coords: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """2-D sin-cos embedding of grid coordinates, relative to their minimum per bag.

    Frequencies ``w_i = 10000^(-i / (dim/4 - 1))``, i < dim/4; embedding
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]``.

    Args:
        coords: [B, N, 2] discretized (x, y) grid coordinates.
        dim: embedding size (multiple of 4).

    Returns:
        [B, N, dim] in ``dtype``.
    """
    rel = coords - coords.amin(dim=1, keepdim=True)
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, device=coords.device) / (quarter - 1))
    x = rel[..., 0:1] * omega  # [B, N, dim/4]
    y = rel[..., 1:2] * omega
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=-1).to(dtype)


def _make_encoder(cfg: ModelConfig) -> nn.Module:
    if cfg.tra_backbone == "Transformer":
        layer = TransformerEncoderLayer(
            cfg.d_model, cfg.tra_nhead, dim_feedforward=cfg.d_model, dropout=cfg.dropout
        )
        return TransformerEncoder(layer, cfg.tra_num_layers)
    return Nystromformer(
        dim=cfg.d_model, depth=cfg.tra_num_layers, heads=cfg.tra_nhead, attn_dropout=cfg.dropout
    )


def _make_x20_embedding(cfg: ModelConfig) -> nn.Module:
    in_dim, out_dim = cfg.dims[0], cfg.dims[1]
    args = (in_dim, out_dim, cfg.emb_x20_ksize, cfg.emb_x20_dw_conv)
    if cfg.emb_x20_backbone == "capool":
        return CAPoolEmbedding(*args, backend=cfg.capool_backend)
    if cfg.emb_x20_backbone == "avgpool":
        return AvgPoolEmbedding(*args)
    return GAPoolEmbedding(*args)


def _make_head(cfg: ModelConfig) -> nn.Sequential:
    enc, out = cfg.enc_dim, cfg.dims[3]
    rep = 2 * enc if cfg.pool == "max_mean" else enc
    if not cfg.cox:
        # The reference sizes this Linear by enc_dim even for max_mean (whose rep is 2*enc_dim)
        # and so cannot run that combination; the input size here is the one that runs.
        return nn.Sequential(nn.Linear(rep, out), nn.Sigmoid())
    if cfg.pool == "max_mean":
        return nn.Sequential(
            nn.Linear(rep, enc),
            nn.ReLU(inplace=True),
            Dropout(cfg.dropout),
            nn.Linear(enc, enc // 2),
            nn.ReLU(inplace=True),
            nn.Linear(enc // 2, out),
        )
    return nn.Sequential(
        nn.Linear(enc, enc // 2),
        nn.ReLU(inplace=True),
        Dropout(cfg.dropout),
        nn.Linear(enc // 2, out),
    )


def _xavier_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DSCA(nn.Module):
    """Dual-stream network with cross-attention (and its single-stream ablations).

    Call ``model(x20, x5, coords)`` -> hazards [B, bins] (Sigmoid) or Cox risk [B, 1];
    with ``return_attention=True`` also a dict of attention maps (see :meth:`forward`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.dual:
            self.patchx20_embedding_layer = _make_x20_embedding(cfg)
            self.patchx5_embedding_layer = Conv1dEmbedding(
                cfg.dims[0], cfg.dims[1], cfg.emb_x5_ksize
            )
            self.patch_encoder_layer = _make_encoder(cfg)
            if cfg.join == "post":
                self.patch_encoder_layer_parallel = _make_encoder(cfg)
        else:
            if cfg.magnification == "x5":
                self.patch_embedding_layer: nn.Module = Conv1dEmbedding(
                    cfg.dims[0], cfg.dims[1], cfg.emb_x5_ksize
                )
            else:
                self.patch_embedding_layer = _make_x20_embedding(cfg)
            self.patch_encoder_layer = _make_encoder(cfg)
        if cfg.pool == "gap":
            self.pool = GAPool(cfg.enc_dim, cfg.enc_dim)
        self.out_layer = _make_head(cfg)
        if not cfg.dual:
            # the reference initialises its single-stream networks this way (and the dual one not)
            self.apply(_xavier_linear)

    # -- forward pieces ---------------------------------------------------------------------
    def _check_inputs(self, x20: Tensor | None, x5: Tensor | None, coords: Tensor | None) -> int:
        cfg = self.cfg
        D = cfg.dims[0]
        n = None
        if cfg.needs_x5:
            if x5 is None or x5.dim() != 3 or x5.shape[-1] != D:
                raise ValueError(f"x5 must be [B, N, {D}], got "
                                 f"{None if x5 is None else tuple(x5.shape)}")
            n = x5.shape[1]
        if cfg.needs_x20:
            if x20 is None or x20.dim() != 3 or x20.shape[-1] != D or x20.shape[1] % BLOCK:
                raise ValueError(f"x20 must be [B, 16N, {D}], got "
                                 f"{None if x20 is None else tuple(x20.shape)}")
            if n is not None and x20.shape[1] != BLOCK * n:
                raise ValueError(f"x20 has {x20.shape[1]} rows but x5 has {n} patches; "
                                 f"expected 16 x20 rows per x5 patch ({BLOCK * n})")
            n = x20.shape[1] // BLOCK
        assert n is not None
        if n == 0:
            raise ValueError("the bag has no patches")
        if coords is not None and (coords.dim() != 3 or coords.shape[1:] != (n, 2)):
            raise ValueError(f"coords must be [B, {n}, 2], got {tuple(coords.shape)}")
        return n

    def _embed_x20(
        self, layer: nn.Module, x20: Tensor, x5: Tensor | None, attn: dict[str, Tensor] | None
    ) -> Tensor:
        if isinstance(layer, CAPoolEmbedding):
            assert x5 is not None
            emb, probs, logits = layer(x20, x5, need_logits=attn is not None)
            if attn is not None:
                attn["cross"] = probs
                attn["cross_logits"] = logits  # type: ignore[assignment]
            return emb
        return layer(x20)

    def _pool(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """feat [B, N, d] -> (representation [B, d or 2d], patch weights [B, N])."""
        pool = self.cfg.pool
        if pool == "gap":
            return self.pool(feat)
        if pool == "mean":
            rep = feat.mean(dim=1)
            return rep, torch.full(feat.shape[:2], 1.0 / feat.shape[1], dtype=feat.dtype,
                                   device=feat.device)
        rep_max, arg = feat.max(dim=1)  # arg [B, d]
        # share of the feature channels for which each patch is the maximum
        share = torch.zeros(feat.shape[:2], dtype=feat.dtype, device=feat.device)
        share.scatter_add_(1, arg, torch.full_like(rep_max, 1.0 / feat.shape[2]))
        if pool == "max":
            return rep_max, share
        return torch.cat([feat.mean(dim=1), rep_max], dim=1), 0.5 * (share + 1.0 / feat.shape[1])

    def forward(
        self,
        x20: Tensor | None,
        x5: Tensor | None,
        coords: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Predict hazards of a bag of aligned patches.

        Args:
            x20: [B, 16N, D] high-res features, block-major (rows 16i..16i+15 = block of patch i,
                row-major in its 4x4 grid); may be None for ``magnification: x5``.
            x5: [B, N, D] low-res features; may be None for ``x20`` with avgpool/gapool.
            coords: [B, N, 2] discretized patient-grid coordinates, or None (no position
                embedding; also ignored when ``tra_position_emb`` is false).
            return_attention: also return the attention maps.

        Returns:
            hazards [B, bins] in (0, 1) (or Cox risk [B, 1]); with ``return_attention`` also
            ``{"cross": [B, N, 4, 16] softmax probabilities, "cross_logits": [B, N, 4, 16]
            raw logits (capool only), "pool": [B, N] patch weights}``.
        """
        cfg = self.cfg
        self._check_inputs(x20, x5, coords)
        attn: dict[str, Tensor] | None = {} if return_attention else None
        ref = x20 if x20 is not None else x5
        assert ref is not None
        pe = None
        if cfg.tra_position_emb and coords is not None:
            pe = sincos_position_embedding(coords, cfg.dims[1], ref.dtype)

        if cfg.dual:
            assert x20 is not None and x5 is not None
            e20 = self._embed_x20(self.patchx20_embedding_layer, x20, x5, attn)
            e5 = self.patchx5_embedding_layer(x5)
            if pe is not None:
                e20, e5 = e20 + pe, e5 + pe
            if cfg.join == "post":
                f20 = self.patch_encoder_layer_parallel(e20)
                f5 = self.patch_encoder_layer(e5)
                feat = torch.cat([f20, f5], dim=2) if cfg.fusion == "cat" else f20 + f5
            else:
                joined = torch.cat([e20, e5], dim=2) if cfg.fusion == "cat" else e20 + e5
                feat = self.patch_encoder_layer(joined)
        else:
            if cfg.magnification == "x5":
                emb = self.patch_embedding_layer(x5)
            else:
                assert x20 is not None
                emb = self._embed_x20(self.patch_embedding_layer, x20, x5, attn)
            if pe is not None:
                emb = emb + pe
            feat = self.patch_encoder_layer(emb)

        rep, pool_attn = self._pool(feat)
        out = self.out_layer(rep)
        if attn is None:
            return out
        attn["pool"] = pool_attn
        return out, attn


def build_model(cfg: Mapping[str, Any] | ModelConfig) -> DSCA:
    """Build DSCA from a reference-style config mapping (model keys only are read) or a
    :class:`ModelConfig`."""
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict(cfg)
    model = DSCA(cfg)
    log.debug("built DSCA (%s, %d parameters)", cfg.magnification, count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (8,567,045 for the reference config)."""
    return sum(p.numel() for p in model.parameters())
