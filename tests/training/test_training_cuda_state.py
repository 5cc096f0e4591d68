"""Checkpoints written on a CUDA machine resume anywhere: the CUDA generators' states are
saved as CPU byte tensors and restored as such (``torch.cuda.set_rng_state_all`` refuses
anything else)."""
from __future__ import annotations

import torch

from dsca.train import checkpoint
from dsca.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_cuda_rng_state_round_trips_as_cpu_byte_tensors(tmp_path, monkeypatch):
    cuda_states = [torch.randint(0, 255, (816,), dtype=torch.uint8) for _ in range(2)]
    restored = []
    monkeypatch.setattr(checkpoint.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint.torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(checkpoint.torch.cuda, "set_rng_state_all", restored.extend)

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "last.pt"
    save_checkpoint(path, kind="last", run_id="r1", fold=0, epoch=0, model=model.state_dict(),
                    optimizer=opt.state_dict(), scheduler={}, stopper={}, scaler=None,
                    history=[], rng=rng_state())
    loaded = load_checkpoint(path, kind="last", run_id="r1", fold=0)
    set_rng_state(loaded["rng"])
    assert len(restored) == 2
    for got, want in zip(restored, cuda_states):
        assert got.device.type == "cpu" and got.dtype == torch.uint8 and torch.equal(got, want)
