"""CAPool test inputs: random blocks, queries and attention weights (imported by the tests)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsca.kernels import CAPoolWeights


@dataclass
class CAPoolInputs:
    """x20 [M,16,C], query [M,C] and nn.MultiheadAttention-layout weights."""

    x20: Tensor
    query: Tensor
    in_proj_weight: Tensor
    in_proj_bias: Tensor
    out_proj_weight: Tensor
    out_proj_bias: Tensor
    num_heads: int

    def tensors(self) -> list[Tensor]:
        return [
            self.x20,
            self.query,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj_weight,
            self.out_proj_bias,
        ]

    def weights(self) -> CAPoolWeights:
        return CAPoolWeights(self.in_proj_weight, self.in_proj_bias, self.out_proj_weight,
                             self.out_proj_bias, self.num_heads)

    def args(self) -> tuple[Tensor, Tensor, CAPoolWeights]:
        """(x20, query, weights): the arguments of every CAPool formulation."""
        return self.x20, self.query, self.weights()

    def to(self, dtype: torch.dtype) -> CAPoolInputs:
        """A detached copy in ``dtype`` with fresh leaves that require grad."""
        t = [x.detach().to(dtype).requires_grad_() for x in self.tensors()]
        return CAPoolInputs(*t, self.num_heads)


def default_device() -> str:
    """CPU under the interpreter (the CI case); CUDA when run by benchmarks/gpu_check.sh."""
    from dsca.kernels.triton_capool import INTERPRETED

    return "cuda" if not INTERPRETED and torch.cuda.is_available() else "cpu"


def make_inputs(
    m: int, c: int, heads: int, seed: int = 0, scale: float = 1.0, device: str | None = None
) -> CAPoolInputs:
    """Inputs whose logits have a spread like a trained model's (softmax neither flat nor one-hot).

    Args:
        m: blocks M; c: channels C; heads: H; scale: multiplies the weights' spread;
        device: defaults to :func:`default_device`.
    """
    g = torch.Generator().manual_seed(seed)
    w = (c**-0.5) * scale
    t = [
        torch.randn(m, 16, c, generator=g),
        torch.randn(m, c, generator=g),
        torch.randn(3 * c, c, generator=g) * w * 2.0,
        torch.randn(3 * c, generator=g) * 0.1,
        torch.randn(c, c, generator=g) * w,
        torch.randn(c, generator=g) * 0.1,
    ]
    dev = device or default_device()
    return CAPoolInputs(*[x.to(dev).requires_grad_() for x in t], heads)
