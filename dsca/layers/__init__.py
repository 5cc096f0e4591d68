"""Building blocks of the DSCA network, with the reference implementation's parameter names and
shapes (so its state dicts load with ``strict=True``).

``conv.py`` (block and sequence convolutions), ``embedding.py`` (the x20 embeddings: CAPool,
mean, gated attention; bag pooling), ``encoder.py`` (Transformer encoder), ``dropout.py``.
Each file opens with the plain formulation; a faster equivalent sits in a private sibling
(``_tap_gemm.py``, ``_chunked_attention.py``, and CAPool's variants in ``dsca.kernels``) and
names the test that proves the two equal.

Notation: ``M = B * N`` blocks, 16 rows per block (row ``4 r + c`` of the 4x4 grid), ``D``
input feature size, ``C`` embedding size, ``H`` heads.
"""
from __future__ import annotations

from dsca.layers.conv import (
    BlockConv2d,
    Conv1dEmbedding,
    SeparableBlockConv2d,
    block_conv3x3,
    block_conv3x3_plain,
)
from dsca.layers.dropout import Dropout, keep_mask
from dsca.layers.embedding import AvgPoolEmbedding, CAPoolEmbedding, GAPool, GAPoolEmbedding
from dsca.layers.encoder import TransformerEncoder, TransformerEncoderLayer, dropout_attention

__all__ = [
    "AvgPoolEmbedding",
    "BlockConv2d",
    "CAPoolEmbedding",
    "Conv1dEmbedding",
    "Dropout",
    "GAPool",
    "GAPoolEmbedding",
    "SeparableBlockConv2d",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "block_conv3x3",
    "block_conv3x3_plain",
    "dropout_attention",
    "keep_mask",
]
