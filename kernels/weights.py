"""The attention weights of CAPool as one typed object."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["CAPoolWeights", "as_weights"]


class CAPoolWeights(NamedTuple):
    """Projections of the block cross-attention, in ``nn.MultiheadAttention``'s layout.

    Attributes:
        in_proj_weight: [3C, C], W_q, W_k and W_v stacked.
        in_proj_bias: [3C], b_q, b_k and b_v stacked.
        out_proj_weight: [C, C], W_o.
        out_proj_bias: [C], b_o.
        num_heads: H, divides C.
    """

    in_proj_weight: Tensor
    in_proj_bias: Tensor
    out_proj_weight: Tensor
    out_proj_bias: Tensor
    num_heads: int

    @property
    def dim(self) -> int:
        """C, the embedding size."""
        return self.out_proj_weight.shape[0]


def as_weights(weights: CAPoolWeights | nn.MultiheadAttention) -> CAPoolWeights:
    """The weights of an ``nn.MultiheadAttention`` (whose forward CAPool never calls) or the
    tuple itself. The tensors are the module's parameters, so gradients reach them."""
    if isinstance(weights, CAPoolWeights):
        return weights
    if isinstance(weights, nn.MultiheadAttention):
        if weights.in_proj_weight is None or weights.in_proj_bias is None:
            raise ValueError("CAPool needs packed in-projections with biases "
                             "(nn.MultiheadAttention with kdim = vdim = embed_dim, bias=True)")
        return CAPoolWeights(weights.in_proj_weight, weights.in_proj_bias,
                             weights.out_proj.weight, weights.out_proj.bias, weights.num_heads)
    raise TypeError(f"CAPool weights must be CAPoolWeights or nn.MultiheadAttention, "
                    f"got {type(weights).__name__}")
