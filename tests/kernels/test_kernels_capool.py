"""CAPool Triton kernels (run by the interpreter on CPU) against the PyTorch paths.

Tolerances are relative to the reference tensor's largest magnitude:
fp32 values 1e-5, fp32 gradients 1e-4; fp16 (fp16 storage, fp32 accumulation, compared with
fp32 math on the same fp16-rounded inputs) values 1e-2, gradients 2e-2.
bf16 is not run here because the interpreter's bf16 is broken; test_kernels_aot.py compiles
the bf16 kernels for real GPU targets instead.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from dsca.kernels import CAPoolWeights, capool, capool_folded, capool_plain
from dsca.kernels.reference import attend_pool_torch
from dsca.kernels.triton_capool import INTERPRETED, attend_pool_triton

from kernels_cases import CAPoolInputs, default_device, make_inputs

pytestmark = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU",
)
DEVICE = default_device()

# (M, C, H): odd M, C not a multiple of the 32-wide C chunk (masked tail), a head count that is
# not a power of two (padded head lanes), one block, head size 1.
SHAPES = [(7, 48, 4), (1, 32, 4), (5, 100, 4), (3, 40, 5), (9, 64, 8), (2, 4, 4)]


def capool_triton(x20: Tensor, query: Tensor, w: CAPoolWeights) -> tuple[Tensor, Tensor]:
    """The Triton variant alone, without the dispatcher's checks (as torch.compile sees it)."""
    return capool_folded(x20, query, w, attend=attend_pool_triton)


def _assert_close(actual: Tensor, expected: Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max |expected| (float64 comparison)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = e.abs().max().clamp_min(1e-12)
    err = (a - e).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def _run(fn, inp: CAPoolInputs, seed: int = 1) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Outputs and gradients of every input for a loss touching both outputs."""
    out, attn = fn(*inp.args())
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g).to(out)
    w_attn = torch.randn(attn.shape, generator=g).to(attn)
    loss = (out.float() * w_out.float()).sum() + (attn.float() * w_attn.float()).sum()
    grads = torch.autograd.grad(loss, inp.tensors())
    return out, attn, list(grads)


_NAMES = ["x20", "query", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"]


def _compare(got, want, rel_val: float, rel_grad: float) -> None:
    _assert_close(got[0], want[0], rel_val, "pooled")
    _assert_close(got[1], want[1], rel_val, "attention")
    for name, g, w in zip(_NAMES, got[2], want[2]):
        _assert_close(g, w, rel_grad, f"d/d{name}")


def _run_without_interpreter(code: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a fresh process with TRITON_INTERPRET unset (Triton reads it at
    import, so this process cannot switch it off)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def _mha_module_capool(inp: CAPoolInputs) -> tuple[Tensor, Tensor, list[Tensor]]:
    """nn.MultiheadAttention itself with the same weights; gradients of the module's params."""
    C = inp.query.shape[-1]
    mha = nn.MultiheadAttention(C, inp.num_heads, batch_first=True, device=inp.x20.device)
    with torch.no_grad():
        mha.in_proj_weight.copy_(inp.in_proj_weight)
        mha.in_proj_bias.copy_(inp.in_proj_bias)
        mha.out_proj.weight.copy_(inp.out_proj_weight)
        mha.out_proj.bias.copy_(inp.out_proj_bias)
    x20 = inp.x20.detach().clone().requires_grad_()
    query = inp.query.detach().clone().requires_grad_()
    out, attn = mha(query[:, None], x20, x20, need_weights=True, average_attn_weights=False)
    out, attn = out[:, 0], attn[:, :, 0]  # [M, C], [M, H, 16]
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g).to(out)).sum()
    loss = loss + (attn * torch.randn(attn.shape, generator=g).to(attn)).sum()
    params = [x20, query, mha.in_proj_weight, mha.in_proj_bias]
    params += [mha.out_proj.weight, mha.out_proj.bias]
    return out, attn, list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize(("m", "c", "heads"), SHAPES)
def test_folded_torch_path_equals_multihead_attention(m: int, c: int, heads: int) -> None:
    inp = make_inputs(m, c, heads, seed=m + c)
    _compare(_run(capool_folded, inp), _mha_module_capool(inp), 1e-5, 1e-4)
    _compare(_run(capool_plain, inp), _mha_module_capool(inp), 1e-5, 1e-4)


@pytest.mark.parametrize(("m", "c", "heads"), SHAPES)
def test_triton_fp32_matches_torch_and_multihead_attention(m: int, c: int, heads: int) -> None:
    inp = make_inputs(m, c, heads, seed=m * c)
    got = _run(capool_triton, inp.to(torch.float32))
    _compare(got, _run(capool_folded, inp.to(torch.float32)), 1e-5, 1e-4)
    _compare(got, _mha_module_capool(inp), 1e-5, 1e-4)


def test_triton_fp32_sharp_softmax() -> None:
    """Large logits (one-hot attention): stable softmax, error no worse than PyTorch fp32.

    Here fp32 itself is ill-conditioned (the torch path is off by ~1e-2 in some gradients
    against float64), so the bound is relative to the torch fp32 error, not a fixed 1e-4.
    """
    inp = make_inputs(4, 32, 4, seed=3, scale=8.0)
    got = _run(capool_triton, inp.to(torch.float32))
    torch32 = _run(capool_folded, inp.to(torch.float32))
    exact = _run(capool_folded, inp.to(torch.float64))
    assert got[1].max() > 0.99  # the case is really sharp
    pairs = [("pooled", got[0], torch32[0], exact[0]), ("attention", got[1], torch32[1], exact[1])]
    pairs += [(f"d/d{n}", a, b, c) for n, a, b, c in zip(_NAMES, got[2], torch32[2], exact[2])]
    for what, a, b, c in pairs:
        assert torch.isfinite(a).all(), what
        err_triton = (a.double() - c).abs().max()
        err_torch = (b.double() - c).abs().max()
        assert err_triton <= 2 * err_torch + 1e-5 * c.abs().max(), (what, err_triton, err_torch)


@pytest.mark.parametrize(("m", "c", "heads"), [(7, 48, 4), (3, 40, 5)])
def test_triton_fp16_matches_fp32_math(m: int, c: int, heads: int) -> None:
    inp16 = make_inputs(m, c, heads, seed=11).to(torch.float16)
    got = _run(capool_triton, inp16)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float16
    assert all(g.dtype == torch.float16 for g in got[2])
    want = _run(capool_folded, inp16.to(torch.float32))  # same fp16-rounded values, fp32 math
    _compare(got, want, 1e-2, 2e-2)


def test_triton_non_contiguous_inputs() -> None:
    m, c, heads = 5, 48, 4
    base = make_inputs(m, c, heads, seed=5)
    # x20 stored [C, 16, M] and viewed as [M, 16, C]; query a strided column slice
    x20 = base.x20.detach().permute(2, 1, 0).contiguous().permute(2, 1, 0).requires_grad_()
    wide = torch.randn(m, 2 * c, device=DEVICE)
    wide[:, ::2] = base.query.detach()
    query = wide[:, ::2].requires_grad_()
    assert not x20.is_contiguous() and not query.is_contiguous()
    inp = CAPoolInputs(x20, query, *base.tensors()[2:], heads)
    _compare(_run(capool_triton, inp), _run(capool_folded, base.to(torch.float32)), 1e-5, 1e-4)


def test_gradient_through_one_output_only() -> None:
    """Backward with only dL/dattention (grad of pooled rows is None) and only dL/dpooled."""
    inp = make_inputs(3, 32, 4, seed=9)
    for pick in (0, 1):
        a = inp.to(torch.float32)
        b = inp.to(torch.float32)
        la = capool_triton(*a.args())[pick].square().sum()
        lb = capool_folded(*b.args())[pick].square().sum()
        n = 6 if pick == 0 else 3  # the attention map does not depend on b_v or W_o, b_o
        grads_a = torch.autograd.grad(la, a.tensors()[:n])
        grads_b = torch.autograd.grad(lb, b.tensors()[:n])
        for name, ga, gb in zip(_NAMES, grads_a, grads_b):
            _assert_close(ga, gb, 1e-4, f"output {pick}: d/d{name}")


def test_core_kernel_gradients_against_float64() -> None:
    """attend-and-pool core alone: Triton fp32 backward vs autograd of the torch core in float64."""
    g = torch.Generator().manual_seed(2)
    k, x, wr, wp = (
        torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE)
        for s in ((3, 5, 12), (3, 16, 12), (3, 5, 12), (3, 5, 16))
    )
    results = []
    for fn, dtype in ((attend_pool_triton, torch.float32), (attend_pool_torch, torch.float64)):
        kk, xx = k.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
        r, p = fn(kk, xx)
        loss = (r.double() * wr).sum() + (p.double() * wp).sum()
        results.append((r, p, *torch.autograd.grad(loss, (kk, xx))))
    for what, a, b in zip(("r", "p", "dk", "dx"), *results):
        _assert_close(a, b, 1e-5, what)


def test_empty_input() -> None:
    inp = make_inputs(0, 32, 4)
    out, attn = capool_triton(*inp.args())
    assert out.shape == (0, 32) and attn.shape == (0, 4, 16)


def test_dispatcher_routes_and_validates() -> None:
    inp = make_inputs(3, 32, 4)
    out, attn = capool(*inp.args(), backend="auto")  # CPU -> PyTorch path, CUDA -> Triton
    auto_impl = capool_folded if DEVICE == "cpu" else capool_triton
    ref_out, ref_attn = auto_impl(*inp.args())
    assert torch.equal(out, ref_out) and torch.equal(attn, ref_attn)
    ref_out, _ = capool_folded(*inp.args())
    out_t, _ = capool(*inp.args(), backend="triton")
    _assert_close(out_t, ref_out, 1e-5, "triton via dispatcher")
    with pytest.raises(ValueError, match="unknown CAPool backend"):
        capool(*inp.args(), backend="cuda")
    with pytest.raises(ValueError, match=r"x20 must be \[M, 16, C\]"):
        capool(inp.x20[:, :8], *inp.args()[1:])
    with pytest.raises(ValueError, match="must divide C"):
        capool(inp.x20, inp.query, inp.weights()._replace(num_heads=5))
    with pytest.raises(ValueError, match=r"out_proj_bias must be \[32\]"):
        capool(inp.x20, inp.query, inp.weights()._replace(out_proj_bias=inp.out_proj_bias[:5]))
    with pytest.raises(ValueError, match=r"norm must normalize \[32\]"):
        capool(*inp.args(), norm=nn.LayerNorm(8))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error() -> None:
    code = (
        "import torch\n"
        "from dsca.kernels import capool\n"
        "x = torch.randn(2, 16, 8); q = torch.randn(2, 8)\n"
        "mha = torch.nn.MultiheadAttention(8, 4)\n"
        "try:\n"
        "    capool(x, q, mha, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    res = _run_without_interpreter(code)
    assert res.returncode == 0, res.stderr
    assert "ERR CAPool backend 'triton' cannot run" in res.stdout
    assert "TRITON_INTERPRET=1" in res.stdout and "cpu" in res.stdout


def test_torch_library_ops_pass_opcheck() -> None:
    """Schema, fake (meta) implementations and autograd registration are consistent."""
    g = torch.Generator().manual_seed(4)
    k = torch.randn(3, 4, 20, generator=g).to(DEVICE)
    x = torch.randn(3, 16, 20, generator=g).to(DEVICE)
    torch.library.opcheck(torch.ops.dsca.capool_attend_pool.default, (k, x))
    r, p = torch.ops.dsca.capool_attend_pool(k, x)
    gr = torch.randn_like(r)
    for gp in (None, torch.randn_like(p)):
        torch.library.opcheck(
            torch.ops.dsca.capool_attend_pool_backward.default, (gr, gp, k, x, p)
        )


def test_torch_compile_fullgraph_matches_eager() -> None:
    inp = make_inputs(5, 32, 4, seed=6)
    compiled = torch.compile(capool_triton, backend="aot_eager", fullgraph=True)
    got = _run(compiled, inp.to(torch.float32))
    _compare(got, _run(capool_triton, inp.to(torch.float32)), 1e-6, 1e-6)


def test_autocast_runs_kernel_in_half_precision() -> None:
    inp = make_inputs(4, 32, 4, seed=8)
    a = inp.to(torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out, attn = capool_triton(*a.args())
        loss = out.float().square().sum() + attn.float().sum()
    assert attn.dtype == torch.float16
    grads = torch.autograd.grad(loss, a.tensors())
    assert all(gr.dtype == torch.float32 for gr in grads)  # leaves keep their dtype
    b = inp.to(torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out_ref, attn_ref = capool_folded(*b.args())
        loss_ref = out_ref.float().square().sum() + attn_ref.float().sum()
    grads_ref = torch.autograd.grad(loss_ref, b.tensors())
    _assert_close(out, out_ref, 1e-2, "autocast pooled")
    for name, g1, g2 in zip(_NAMES, grads, grads_ref):
        _assert_close(g1, g2, 3e-2, f"autocast d/d{name}")


def test_gpu_triton_op_registration_traces_with_fake_cuda_tensors() -> None:
    """Without the interpreter the ops are torch.library.triton_ops (the route torch.compile
    uses on GPUs); their implementations trace on fake CUDA tensors on a machine with no GPU."""
    code = (
        "import torch\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "import dsca.kernels.triton_capool as tc\n"
        "assert not tc.INTERPRETED\n"
        "with FakeTensorMode():\n"
        "    k = torch.empty(5, 4, 40, device='cuda', dtype=torch.bfloat16)\n"
        "    x = torch.empty(5, 16, 40, device='cuda', dtype=torch.bfloat16)\n"
        "    r, p = torch.ops.dsca.capool_attend_pool(k, x)\n"
        "    dk, dx = torch.ops.dsca.capool_attend_pool_backward(r, p, k, x, p)\n"
        "    print(tuple(r.shape), r.dtype, r.device.type, tuple(p.shape), p.dtype,\n"
        "          tuple(dk.shape), dk.dtype, tuple(dx.shape), dx.dtype)\n"
    )
    res = _run_without_interpreter(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [
        "(5,", "4,", "40)", "torch.bfloat16", "cuda", "(5,", "4,", "16)", "torch.float32",
        "(5,", "4,", "40)", "torch.bfloat16", "(5,", "16,", "40)", "torch.bfloat16",
    ]


@pytest.mark.parametrize("backend", ["torch", "plain", "triton"])
def test_norm_prologue_equals_unfused_ops(backend: str) -> None:
    """capool(y, q, w, norm=ln) is capool(relu(ln(y)), q, w) on every backend: fused into the
    core on the torch backend (``fused_cpu.py``), applied first elsewhere."""
    inp = make_inputs(140, 32, 4, seed=9)  # more than one chunk of the fused core
    ln = nn.LayerNorm(32, device=inp.x20.device)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)

    def with_prologue(x20, query, w):
        return capool(x20, query, w, norm=ln, backend=backend)

    def applied_first(x20, query, w):
        return capool_folded(torch.relu(ln(x20)), query, w)

    got, want = _run(with_prologue, inp), _run(applied_first, inp)
    _compare(got, want, 1e-5, 1e-4)
