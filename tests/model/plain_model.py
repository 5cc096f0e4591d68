"""A plain re-statement of the reference forward pass (helpers of the model tests).

A module of its own name, not ``conftest``: test files import it, and ``from conftest import``
would pick whichever folder's conftest pytest loaded last (``pytest tests/model tests/training``
failed to collect).

``plain_forward(cfg, sd, x20, x5, coords)`` computes DSCA the way the reference code does,
reading every parameter BY NAME from a state dict: the x20 stream is reshaped to [M, D, 4, 4]
squares for ``F.conv2d`` with zero padding, CAPool runs ``nn.MultiheadAttention`` over the
stacked [16, M, C] rows (K and V materialized), GAPool / position embedding / pooling written
out. Comparing it with the model loaded from the same state dict checks both the numerics and
that every parameter is used where its name says.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from nystrom_attention import Nystromformer
from torch import Tensor, nn

from dsca.model import ModelConfig


def _sub(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _ln(sd: dict[str, Tensor], pre: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[pre + "weight"], sd[pre + "bias"])


def plain_conv1d_embedding(sd, pre, x, norm=True):
    w = sd[pre + "conv.weight"]
    y = F.conv1d(x.transpose(2, 1), w, sd[pre + "conv.bias"], padding=(w.shape[-1] - 1) // 2)
    y = y.transpose(2, 1)
    return _ln(sd, pre + "norm.", y) if norm else y


def plain_square_rows(sd, pre, x20, cfg: ModelConfig):
    """[B, 16N, D] -> squares [M, D, 4, 4] -> conv -> rows [B, 16N, C] -> LN -> ReLU."""
    B, L, D = x20.shape
    sq = x20.reshape(-1, 4, 4, D).permute(0, 3, 1, 2)
    k = cfg.emb_x20_ksize
    if cfg.emb_x20_dw_conv:
        lo, hi = (k - 1) // 2, k - 1 - (k - 1) // 2
        sq = F.pad(sq, [lo, hi, lo, hi])
        sq = F.conv2d(sq, sd[pre + "conv.depthwise_conv.conv.weight"], None, groups=D)
        y = F.conv2d(
            sq,
            sd[pre + "conv.pointwise_conv.conv.weight"],
            sd[pre + "conv.pointwise_conv.conv.bias"],
        )
    else:
        y = F.conv2d(sq, sd[pre + "conv.weight"], sd[pre + "conv.bias"], padding=(k - 1) // 2)
    y = y.reshape(y.shape[0], y.shape[1], 16).transpose(1, 2).reshape(B, L, -1)
    return F.relu(_ln(sd, pre + "norm.", y))


def plain_gapool(sd, pre, x):
    emb = torch.tanh(F.linear(x, sd[pre + "fc1.0.weight"], sd[pre + "fc1.0.bias"]))
    scr = torch.sigmoid(F.linear(x, sd[pre + "score.0.weight"], sd[pre + "score.0.bias"]))
    a = F.linear(emb * scr, sd[pre + "fc2.weight"], sd[pre + "fc2.bias"]).transpose(2, 1)
    a = F.softmax(a, dim=2)  # [B, 1, N]
    return torch.matmul(a, x).squeeze(1), a.squeeze(1)


def plain_x20_embedding(sd, pre, x20, x5, cfg: ModelConfig, attn: dict, logits: bool = True):
    C = cfg.dims[1]
    rows = plain_square_rows(sd, pre, x20, cfg)  # [B, 16N, C]
    B = rows.shape[0]
    if cfg.emb_x20_backbone == "avgpool":
        return rows.reshape(-1, 16, C).mean(dim=1).reshape(B, -1, C)
    if cfg.emb_x20_backbone == "gapool":
        pooled, _ = plain_gapool(sd, pre + "pool.", rows.reshape(-1, 16, C))
        return pooled.reshape(B, -1, C)
    query = plain_conv1d_embedding(sd, pre + "conv_patch_x5.", x5, norm=False)  # [B, N, C]
    N = query.shape[1]
    kv = rows.reshape(-1, 16, C).transpose(0, 1)  # [16, M, C]
    q = query.reshape(-1, 1, C).transpose(0, 1)  # [1, M, C]
    # what nn.MultiheadAttention(C, 4).forward runs, on the state dict's own tensors (so that
    # gradients reach them)
    w_in, b_in = sd[pre + "cross_att_pool.in_proj_weight"], sd[pre + "cross_att_pool.in_proj_bias"]
    out, probs = F.multi_head_attention_forward(
        q, kv, kv, C, 4, w_in, b_in, None, None, False, 0.0,
        sd[pre + "cross_att_pool.out_proj.weight"], sd[pre + "cross_att_pool.out_proj.bias"],
        training=False, need_weights=True, average_attn_weights=False,
    )
    attn["cross"] = probs.reshape(B, N, 4, 16)
    if not logits:
        return out.squeeze(0).reshape(B, N, C)
    # raw logits with K materialized: [M, H, 16]
    w_q, w_k, _ = w_in.chunk(3)
    b_q, b_k, _ = b_in.chunk(3)
    Q = (F.linear(q[0], w_q, b_q) / math.sqrt(C // 4)).reshape(-1, 4, C // 4)
    K = F.linear(kv, w_k, b_k).reshape(16, -1, 4, C // 4)
    attn["cross_logits"] = torch.einsum("mhd,jmhd->mhj", Q, K).reshape(B, N, 4, 16)
    return out.squeeze(0).reshape(B, N, C)


def plain_pe(coords, dim):
    out = []
    for c in coords:  # one bag at a time, as the reference
        c = c - c.min(dim=0).values
        omega = torch.arange(dim // 4) / (dim // 4 - 1)
        omega = 1.0 / (10000**omega)
        y = c[:, 1].flatten()[:, None] * omega[None, :]
        x = c[:, 0].flatten()[:, None] * omega[None, :]
        out.append(torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1))
    return torch.stack(out)


def plain_encoder(sd, pre, cfg: ModelConfig, d_model: int):
    """torch's own encoder, run on the state dict's tensors (functional_call: gradients reach
    them)."""
    if cfg.tra_backbone == "Transformer":
        layer = nn.TransformerEncoderLayer(
            d_model, cfg.tra_nhead, dim_feedforward=d_model, dropout=cfg.dropout,
            activation="relu", batch_first=True,
        )
        enc: nn.Module = nn.TransformerEncoder(layer, num_layers=cfg.tra_num_layers,
                                               enable_nested_tensor=False)
    else:
        enc = Nystromformer(dim=d_model, depth=cfg.tra_num_layers, heads=cfg.tra_nhead,
                            attn_dropout=cfg.dropout)
    params = _sub(sd, pre)
    assert set(params) == set(enc.state_dict()), f"{pre}: names differ from torch's"
    enc.eval()
    return lambda x: torch.func.functional_call(enc, params, (x,))


def plain_head(sd, cfg: ModelConfig, enc_dim: int):
    p = cfg.dropout
    if cfg.dims[3] != 1:
        rep = 2 * enc_dim if cfg.pool == "max_mean" else enc_dim
        head = nn.Sequential(nn.Linear(rep, cfg.dims[3]), nn.Sigmoid())
    elif cfg.pool == "max_mean":
        head = nn.Sequential(nn.Linear(2 * enc_dim, enc_dim), nn.ReLU(), nn.Dropout(p),
                             nn.Linear(enc_dim, enc_dim // 2), nn.ReLU(),
                             nn.Linear(enc_dim // 2, 1))
    else:
        head = nn.Sequential(nn.Linear(enc_dim, enc_dim // 2), nn.ReLU(), nn.Dropout(p),
                             nn.Linear(enc_dim // 2, 1))
    params = _sub(sd, "out_layer.")
    assert set(params) == set(head.state_dict())
    head.eval()
    return lambda x: torch.func.functional_call(head, params, (x,))


def plain_forward(cfg: ModelConfig, sd: dict[str, Tensor], x20, x5, coords, logits=True):
    """The reference forward pass (eval mode), parameters read by name from ``sd``; with
    ``logits`` also the raw cross-attention logits (K materialized, as the reference did)."""
    attn: dict[str, Tensor] = {}
    C = cfg.dims[1]
    pe = plain_pe(coords, C) if (coords is not None and cfg.tra_position_emb) else None
    if cfg.magnification == "x5_x20":
        e20 = plain_x20_embedding(sd, "patchx20_embedding_layer.", x20, x5, cfg, attn, logits)
        e5 = plain_conv1d_embedding(sd, "patchx5_embedding_layer.", x5)
        if pe is not None:
            e20, e5 = e20 + pe, e5 + pe.clone()
        if cfg.join == "post":
            f20 = plain_encoder(sd, "patch_encoder_layer_parallel.", cfg, C)(e20)
            f5 = plain_encoder(sd, "patch_encoder_layer.", cfg, C)(e5)
            feat = torch.cat([f20, f5], dim=2) if cfg.fusion == "cat" else f20 + f5
            enc_dim = 2 * C if cfg.fusion == "cat" else C
        else:
            emb = torch.cat([e20, e5], dim=2) if cfg.fusion == "cat" else e20 + e5
            enc_dim = emb.shape[-1]
            feat = plain_encoder(sd, "patch_encoder_layer.", cfg, enc_dim)(emb)
    else:
        if cfg.magnification == "x5":
            emb = plain_conv1d_embedding(sd, "patch_embedding_layer.", x5)
        else:
            emb = plain_x20_embedding(sd, "patch_embedding_layer.", x20, x5, cfg, attn, logits)
        if pe is not None:
            emb = emb + pe
        enc_dim = C
        feat = plain_encoder(sd, "patch_encoder_layer.", cfg, C)(emb)
    if cfg.pool == "mean":
        rep = feat.mean(dim=1)
    elif cfg.pool == "max":
        rep = feat.max(dim=1).values
    elif cfg.pool == "max_mean":
        rep = torch.cat([feat.mean(dim=1), feat.max(dim=1).values], dim=1)
    else:
        rep, attn["pool"] = plain_gapool(sd, "pool.", feat)
    return plain_head(sd, cfg, enc_dim)(rep), attn


def randomize_state_dict(sd: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Random values of fan-in scale for every entry (non-zero biases, so that e.g. the key
    bias of the cross-attention, which cancels in its softmax, is really exercised)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sd.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        r = torch.randn(t.shape, generator=g, dtype=t.dtype)
        if "norm" in name and name.endswith("weight"):
            out[name] = 1.0 + 0.2 * r
        elif t.dim() >= 2:
            out[name] = r / math.sqrt(t[0].numel())
        else:
            out[name] = 0.2 * r
    return out
