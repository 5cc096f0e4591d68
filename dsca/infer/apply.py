"""Apply a run's models to the patients of a store: each patient read once, every model on it.

Inputs and outputs are computed exactly as training evaluates a fold (the same dataset, model
inputs, mixed-precision context and CPU thread count), so a fold model's risks of its own test
patients come out equal to the run's ``predictions.csv``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsca.infer.models import RunModel
from dsca.train.data import single_patient_loader, to_model_inputs
from dsca.train.device import autocast_context, cpu_threads

__all__ = ["PatientResult", "apply_models"]


@dataclass
class PatientResult:
    """One patient's outputs of every model.

    Attributes:
        patient_id: the id.
        slide_ids: its slides, in the order they were concatenated; lengths: their patches.
        outputs: per model [K] hazards (or [1] Cox log hazard), float32 on the CPU.
        attention: per model ``{"cross": [N, heads, 16], "pool": [N]}`` (only when asked).
    """

    patient_id: str
    slide_ids: list[str]
    lengths: list[int]
    outputs: list[torch.Tensor]
    attention: list[dict[str, torch.Tensor]] | None = None


def apply_models(
    models: Sequence[RunModel],
    store: str | Path,
    patient_slides: Mapping[str, Sequence[str]],
    device: torch.device,
    *,
    attention: bool = False,
    num_workers: int = 2,
    desc: str = "predict",
    progress: bool = True,
) -> Iterator[PatientResult]:
    """Yield each patient's outputs of every model, in the order of ``patient_slides``.

    Args:
        models: the run's models (moved to ``device`` here).
        store: the feature store.
        patient_slides: patient id -> slide ids (concatenated in this order, as in training).
        attention: also return the attention maps (CAPool and pooling).
        num_workers: loader processes reading the next patients meanwhile.
        progress: show a progress bar where the terminal takes one (off on torchrun ranks
            other than 0, which would repeat rank 0's).
    """
    from dsca.store import PatientDataset

    for m in models:
        m.model.to(device).eval()
    dataset = PatientDataset(store, patient_slides)
    position_emb = bool(models[0].config.tra_position_emb)
    loader = single_patient_loader(dataset, num_workers)
    for sample in tqdm(loader, desc=desc, total=len(dataset), unit="patient",
                       disable=None if progress else True):
        # the contexts are entered per patient: the caller's code between two patients runs
        # with its own grad mode and thread count
        threads = cpu_threads(models[0].num_threads) if device.type == "cpu" else contextlib.nullcontext()
        with threads, torch.no_grad():
            x20, x5, coords, _ = to_model_inputs(sample, device, position_emb)
            outs, maps = [], []
            for m in models:
                with autocast_context(device, m.amp):
                    got = m.model(x20, x5, coords, return_attention=attention)
                if attention:
                    out, attn = got
                    maps.append({k: attn[k][0].float().cpu() for k in ("cross", "pool") if k in attn})
                else:
                    out = got
                outs.append(out[0].float().cpu())
        slides = list(patient_slides[sample.patient_id])
        lengths = [dataset.store.n_patches(s) for s in slides]
        yield PatientResult(str(sample.patient_id), slides, lengths, outs, maps if attention else None)
