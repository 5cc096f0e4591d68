"""Multiply-accumulates of one DSCA forward pass, counted from the config (no model built).

``dsca profile`` and the benchmarks compare these with ``torch.utils.flop_counter``
(``tests/model/test_model_costs.py`` checks the two agree), for our formulation and the plain
one (zero-padded convolution, K and V of every x20 row).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsca.config.model import ModelConfig
from dsca.layers import CAPoolEmbedding

__all__ = ["count_macs", "macs_per_module"]


def count_macs(
    cfg: Mapping[str, Any] | ModelConfig, n_patches: int, formulation: str = "ours"
) -> dict[str, int]:
    """Multiply-accumulates of one forward pass over one bag of ``n_patches`` x5 patches.

    Counts the matrix products (convolutions, projections, attention); element-wise work
    (norms, activations, softmax) is left out.

    Args:
        cfg: model config.
        n_patches: N, the number of low-res patches (16 N high-res rows).
        formulation: "ours" (per-tap block conv over real taps, folded CAPool) or "plain"
            (zero-padded 3x3 conv, K and V of all 16 N rows materialized).

    Returns:
        MACs per part (keys ``x20_conv``, ``x20_pool``, ``x5_embedding``, ``encoders``,
        ``pool``, ``head``) and ``total``.
    """
    if formulation not in ("ours", "plain"):
        raise ValueError(f"formulation must be 'ours' or 'plain', got {formulation!r}")
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict(cfg)
    N = n_patches
    D, C = cfg.dims[0], cfg.dims[1]
    k = cfg.emb_x20_ksize
    macs: dict[str, int] = {}
    if cfg.needs_x20:
        # tap-positions per block: all k*k*16 when zero-padded (the plain way, and our
        # depthwise conv, which is a padded grouped conv2d), only the 100 real ones otherwise
        taps = 100 if formulation == "ours" and k == 3 and not cfg.emb_x20_dw_conv else 16 * k * k
        if cfg.emb_x20_dw_conv:
            macs["x20_conv"] = N * taps * D + N * 16 * D * C
        else:
            macs["x20_conv"] = N * taps * D * C
        if cfg.emb_x20_backbone == "capool":
            H = CAPoolEmbedding.num_heads
            q = N * D * C + N * C * C  # x5 query Conv1d k=1 + W_q
            if formulation == "plain":
                kv = 2 * 16 * N * C * C  # K and V of every row
                att = 2 * 16 * N * C  # logits and weighted sum, all heads
            else:
                kv = N * H * (C // H) * C + N * C * C  # W_k^T u_h, W_v after pooling (per head)
                att = 2 * N * H * 16 * C  # logits and pooled rows, per head over all C
            macs["x20_pool"] = q + kv + att + N * C * C  # + out projection
        elif cfg.emb_x20_backbone == "gapool":
            macs["x20_pool"] = 16 * N * (2 * C * C + C) + 16 * N * C
        else:
            macs["x20_pool"] = 0
    if cfg.magnification != "x20":
        macs["x5_embedding"] = N * D * C * cfg.emb_x5_ksize
    d = cfg.d_model
    n_enc = 2 if cfg.dual and cfg.join == "post" else 1
    if cfg.tra_backbone == "Transformer":
        per_layer = N * d * 3 * d + 2 * N * N * d + N * d * d + 2 * N * d * d
    else:
        # nystrom-attention defaults: 256 landmarks, 64 per head, 6 pseudo-inverse iterations of
        # 4 [m, m] products, a 33-tap residual conv; the sequence is zero-padded to a multiple
        # of m before the projections; feed-forward 4x
        m, dh, H = 256, 64, cfg.tra_nhead
        n = -(-N // m) * m
        inner = H * dh
        attn = H * (2 * n * m * dh + m * m * dh + 6 * 4 * m**3 + n * m * m + 2 * n * m * dh)
        per_layer = n * d * 3 * inner + attn + H * n * dh * 33 + n * inner * d + 8 * N * d * d
    macs["encoders"] = n_enc * cfg.tra_num_layers * per_layer
    e = cfg.enc_dim
    macs["pool"] = 2 * N * e * e + N * e + N * e if cfg.pool == "gap" else 0
    rep = 2 * e if cfg.pool == "max_mean" else e
    if cfg.cox:
        first = rep * e + e * e // 2 if cfg.pool == "max_mean" else e * e // 2
        macs["head"] = first + e // 2
    else:
        macs["head"] = rep * cfg.dims[3]
    macs["total"] = sum(macs.values())
    return macs


def macs_per_module(cfg: ModelConfig, n_patches: int) -> tuple[dict[str, int], int]:
    """Forward MACs of :func:`count_macs` per top-level module name of ``DSCA``, and the total."""
    macs = count_macs(cfg, n_patches)
    embed_x20 = macs.get("x20_conv", 0) + macs.get("x20_pool", 0)
    enc = macs["encoders"]
    if cfg.dual:
        out = {"patchx20_embedding_layer": embed_x20,
               "patchx5_embedding_layer": macs["x5_embedding"]}
        if cfg.join == "post":  # two encoders of the same size
            out["patch_encoder_layer"] = out["patch_encoder_layer_parallel"] = enc // 2
        else:
            out["patch_encoder_layer"] = enc
    else:
        out = {"patch_embedding_layer": embed_x20 + macs.get("x5_embedding", 0),
               "patch_encoder_layer": enc}
    out["pool"], out["out_layer"] = macs["pool"], macs["head"]
    return out, macs["total"]
