"""What CUDA will run, exercised on the CPU where PyTorch allows: mixed precision dtype flow,
fp32 weight-gradient accumulation, the cuDNN form of the block convolution, and
``torch.compile`` of the whole model over several bag sizes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsca import build_model
from dsca.layers import BlockConv2d, Dropout, block_conv3x3, block_conv3x3_plain
from dsca.layers._tap_gemm import _M_CHUNK, per_tap_block_conv3x3
from dsca.model import ModelConfig

SMALL = {"dims": "32-16-16-4", "tra_nhead": 2, "dropout": 0.3, "capool_backend": "torch"}


def _bag(n: int, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16 * n, d, generator=g), torch.randn(1, n, d, generator=g),
            torch.randint(0, 2 * n, (1, n, 2), generator=g))


def test_dropout_keeps_the_activation_dtype():
    """Under autocast a bf16 activation stays bf16 through dropout (a float32 mask would make
    every later op fp32 and keep a float32 copy for backward)."""
    drop = Dropout(0.4).train()
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    y = drop(x)
    assert y.dtype == torch.bfloat16
    kept = y != 0
    torch.testing.assert_close(y[kept].float(), (x[kept].float() / 0.6), rtol=1e-2, atol=0)


def test_training_step_under_bf16_autocast_keeps_bf16_activations():
    """A whole training step with dropout on under CPU bf16 autocast: the outputs of every
    linear, convolution and dropout module are bf16 (no silent upcast) and every parameter
    gets a finite gradient."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(SMALL)).train()
    seen: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = out.dtype
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Dropout, BlockConv2d, nn.Conv1d)):
            mod.register_forward_hook(record(name))
    x20, x5, coords = _bag(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x20, x5, coords)
    out.float().sum().backward()
    assert any(isinstance(m, Dropout) for m in model.modules())
    wrong = {n: d for n, d in seen.items() if d != torch.bfloat16}
    assert seen and not wrong, f"upcast outputs: {wrong}"
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_block_conv_weight_gradient_accumulates_in_fp32_under_autocast():
    """Chunks of blocks add their weight-gradient parts into one fp32 sum: 256 from the first
    chunk plus 1 from each of 7 later chunks is 263 (a bf16 running sum stays at 256)."""
    M = 8 * _M_CHUNK
    x = torch.zeros(M, 16, 1)
    x[0] = 16.0  # first chunk: 16 positions x 16 = 256 through the centre tap
    for k in range(1, 8):
        x[k * _M_CHUNK, 5] = 1.0  # an inner position, so only its centre tap sees the grid edge
    weight = torch.zeros(1, 1, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = per_tap_block_conv3x3(x, weight)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32
    assert weight.grad[0, 0, 1, 1].item() == 263.0


def test_cuda_tensors_take_the_cudnn_form_of_the_block_convolution(monkeypatch):
    """``block_conv3x3`` on CUDA tensors is ``block_conv3x3_plain`` (one cuDNN conv2d), never
    the per-tap CPU form; checked with fake CUDA tensors, which need no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import dsca.layers.conv as conv

    def per_tap_must_not_run(*args):
        raise AssertionError("the per-tap CPU form ran on CUDA tensors")

    monkeypatch.setattr(conv, "per_tap_block_conv3x3", per_tap_must_not_run)
    with FakeTensorMode():
        x = torch.empty(7, 16, 5, device="cuda")
        w = torch.empty(6, 5, 3, 3, device="cuda")
        out = block_conv3x3(x, w, None)
    assert out.shape == (7, 16, 6) and out.device.type == "cuda"
    with torch.no_grad():  # and the CPU still takes the per-tap form
        try:
            block_conv3x3(torch.randn(2, 16, 5), torch.randn(6, 5, 3, 3))
        except AssertionError as err:
            assert "per-tap" in str(err)
        else:
            raise AssertionError("the CPU did not take the per-tap form")


def test_plain_form_of_the_block_convolution_is_conv2d_on_squares():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 16, 5, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    sq = x.view(7, 4, 4, 5).permute(0, 3, 1, 2)
    ref = F.conv2d(sq, w, b, padding=1).permute(0, 2, 3, 1).reshape(7, 16, 6)
    torch.testing.assert_close(block_conv3x3_plain(x, w, b), ref)
    torch.testing.assert_close(block_conv3x3(x, w, b), ref)


def test_compiled_model_over_several_bag_sizes_recompiles_a_bounded_number_of_times():
    """``torch.compile(model, dynamic=True)`` on bags of 5 sizes: outputs equal eager, and bags
    of 3 new sizes compile nothing more (dynamic shapes, not one graph per slide size; the
    CPU-only chunked forms run eagerly between the graphs)."""
    torch._dynamo.reset()
    model = build_model(ModelConfig.from_dict({**SMALL, "dropout": 0.0})).eval()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend, dynamic=True)
    sizes = (5, 7, 9, 12, 17)
    with torch.no_grad():
        for n in sizes:
            x20, x5, coords = _bag(n, seed=n)
            torch.testing.assert_close(compiled(x20, x5, coords), model(x20, x5, coords),
                                       atol=1e-5, rtol=1e-5)
    first_pass = len(graphs)
    assert first_pass >= 1
    with torch.no_grad():
        for n in (6, 11, 23):
            compiled(*_bag(n, seed=n))
    assert len(graphs) == first_pass, "new bag sizes still recompile"
    torch._dynamo.reset()


def test_model_compiles_with_cpu_inductor():
    """The real compiler (inductor, CPU): equal to eager on two bag sizes, the second reusing
    the first one's graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build_model(ModelConfig.from_dict({**SMALL, "dropout": 0.0})).eval()
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        x = _bag(5, seed=5)
        torch.testing.assert_close(compiled(*x), model(*x), atol=1e-5, rtol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        x = _bag(9, seed=9)
        torch.testing.assert_close(compiled(*x), model(*x), atol=1e-5, rtol=1e-5)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
