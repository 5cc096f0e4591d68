"""The DSCA model trains the same with capool_backend="triton" (interpreted) and "torch"."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("nystrom_attention")  # the model's dependency (absent on bare GPU images)

from dsca import build_model  # noqa: E402
from dsca.kernels.triton_capool import INTERPRETED  # noqa: E402
from kernels_cases import default_device  # noqa: E402

pytestmark = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU",
)
DEVICE = default_device()

CFG = {"dims": "24-16-16-4", "tra_nhead": 2, "dropout": 0.0}


def _train_one_step(backend: str, state: dict, batch: tuple) -> tuple[torch.Tensor, dict, dict]:
    """Hazards, gradients and parameters after one SGD step from ``state``."""
    model = build_model({**CFG, "capool_backend": backend}).to(DEVICE)
    model.load_state_dict(state)
    model.train()
    # SGD, not Adam: Adam would blow rounding noise in exactly-zero gradients up to full steps
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(123)  # same dropout masks for both backends
    hazards, attn = model(*batch, return_attention=True)
    # a survival-style loss on the hazards plus a term on the cross-attention map, so the
    # kernels' gradient through the attention probabilities is exercised too
    loss = -torch.log(1 - hazards[:, :2]).sum() - torch.log(hazards[:, 2]).sum()
    loss = loss + 0.1 * attn["cross"].square().sum()
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return hazards.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_model_step_with_triton_backend_matches_torch_backend() -> None:
    torch.manual_seed(0)
    state = build_model({**CFG, "capool_backend": "torch"}).state_dict()
    n = 7  # odd number of low-res patches
    g = torch.Generator().manual_seed(1)
    x5 = torch.randn(1, n, 24, generator=g)
    x20 = torch.randn(1, 16 * n, 24, generator=g)
    coords = torch.stack([torch.arange(n) % 3, torch.arange(n) // 3], dim=-1)[None]
    batch = (x20.to(DEVICE), x5.to(DEVICE), coords.to(DEVICE))

    h_torch, g_torch, p_torch = _train_one_step("torch", state, batch)
    h_triton, g_triton, p_triton = _train_one_step("triton", state, batch)

    torch.testing.assert_close(h_triton, h_torch, rtol=1e-5, atol=1e-6)
    assert g_triton.keys() == g_torch.keys()
    capool_params = [k for k in g_torch if "cross_att_pool" in k]
    assert capool_params, "the model has no CAPool parameters: the test would prove nothing"
    for name in g_torch:
        # plus 1e-6 absolute: some gradients are zero in exact arithmetic (a bias before a
        # softmax) and hold only rounding noise
        scale = g_torch[name].abs().max()
        err = (g_triton[name] - g_torch[name]).abs().max()
        assert err <= 1e-4 * scale + 1e-6, f"grad of {name}: {err:.3g} vs scale {scale:.3g}"
    for name in p_torch:
        torch.testing.assert_close(p_triton[name], p_torch[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_step_with_triton_backend_under_autocast(dtype: torch.dtype) -> None:
    """Mixed precision as CUDA runs it, through the interpreted kernels: the attention maps come
    out in the autocast dtype, every parameter gets a finite gradient, and the hazards
    agree with the torch backend under the same autocast."""
    torch.manual_seed(0)
    state = build_model({**CFG, "capool_backend": "torch"}).state_dict()
    n = 5
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(1, 16 * n, 24, generator=g).to(DEVICE),
             torch.randn(1, n, 24, generator=g).to(DEVICE), None)
    out = {}
    for backend in ("triton", "torch"):
        model = build_model({**CFG, "capool_backend": backend}).to(DEVICE)
        model.load_state_dict(state)
        model.train()
        with torch.autocast(DEVICE, dtype=dtype):
            hazards, attn = model(*batch, return_attention=True)
        assert attn["cross"].dtype == dtype, backend
        hazards.float().sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, (backend, name)
            assert torch.isfinite(p.grad).all(), (backend, name)
        out[backend] = hazards.float().detach()
    torch.testing.assert_close(out["triton"], out["torch"], atol=2e-2, rtol=0)
