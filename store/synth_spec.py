"""The size and signal of a synthetic cohort (:class:`SynthSpec`) and the bounds it must keep.

:func:`check_spec` refuses a spec out of bounds before :mod:`dsca.store.synth` writes anything;
the bounds lie far beyond any useful cohort and only stop a typo from filling memory and disk.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from dsca.coords import BLOCK

__all__ = ["SynthSpec", "check_spec"]

# Bounds of the spec: (field, CLI option or None, low, high). Far beyond any useful cohort, they
# keep a typo (--patches 100000000) from filling memory and disk.
_INT_BOUNDS = (
    ("patients", "--patients", 1, 100_000),
    ("patches", "--patches", 1, 20_000),
    ("dim", "--dim", 8, 16_384),  # 7 orthonormal planted directions need dim >= 8
    ("seed", "--seed", 0, 2**63 - 1),
    ("motif_rows", None, 1, BLOCK),
    ("folds", None, 1, 100),
)
# One slide's x20 block (patches x 16 rows x dim float64, generated at once) stays under ~0.5 GB.
_MAX_PATCHES_X_DIM = 2**22


@dataclass(frozen=True)
class SynthSpec:
    """Size and signal of a synthetic cohort.

    Attributes:
        patients: number of patients.
        seed: everything is deterministic given the seed.
        pattern_seed: seed of the planted vectors only (tissue prototypes and motif: the
            "encoder's feature space"); None = ``seed``. Two cohorts with the same
            pattern_seed and different seeds are independent patients whose features a model
            trained on one can read in the other (an external validation cohort).
        dim: feature dimension D of both levels.
        patches: mean number of low-res patches per slide.
        signal: log-hazard ratio per standard deviation of the tumour-motif rate.
        censoring: target fraction of censored patients.
        multi_slide: fraction of patients with 2-3 slides.
        motif_rows: rows (of 16) that carry the motif in a positive block.
        decoy_rate: mean motif rate in non-tumour blocks (per patient uniform on
            [0, 2 * decoy_rate], independent of risk).
        noise: feature noise standard deviation (prototypes have unit norm * 2).
        h5_files: also write CLAM's h5_files/ copies (features + coords).
        folds: number of cross-validation splits.
    """

    patients: int = 100
    seed: int = 0
    pattern_seed: int | None = None
    dim: int = 128
    patches: int = 90
    signal: float = 1.5
    censoring: float = 0.35
    multi_slide: float = 0.25
    motif_rows: int = 3
    decoy_rate: float = 0.3
    noise: float = 1.0
    h5_files: bool = True
    folds: int = 5



def check_spec(spec: SynthSpec) -> None:
    """Refuse a spec out of bounds before anything is written.

    Bounds: ``patients`` 1..100000 (and at least ``folds``), ``patches`` 1..20000, ``dim``
    8..16384, ``patches * dim`` <= 4194304 (one slide's x20 rows are made in memory at once),
    ``seed`` >= 0, ``signal`` finite, ``censoring`` in [0, 1), ``multi_slide`` in [0, 1],
    ``decoy_rate`` and ``noise`` finite and >= 0, ``motif_rows`` 1..16, ``folds`` 1..100.

    Raises:
        ValueError: naming the option (``--patches`` ...) or the field, its bounds and the value.
    """
    def shown_name(attr: str, option: str | None) -> str:
        # the CLI option where there is one, else the field
        return option if option is not None else f"SynthSpec.{attr}"

    for attr, option, lo, hi in _INT_BOUNDS:
        value = getattr(spec, attr)
        if attr == "seed" and spec.pattern_seed is not None:
            ps = spec.pattern_seed
            if isinstance(ps, bool) or not isinstance(ps, numbers.Integral) or not lo <= ps <= hi:
                raise ValueError(f"SynthSpec.pattern_seed must be None or an integer in {lo}..{hi}, got {ps!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
            raise ValueError(f"{shown_name(attr, option)} must be an integer in {lo}..{hi}, got {value!r}")
    reals = (
        ("signal", "--signal", -math.inf, math.inf, "a finite number"),
        ("censoring", "--censoring", 0.0, 1.0, "in [0, 1) (the target censored fraction)"),
        ("multi_slide", None, 0.0, 1.0, "in [0, 1]"),
        ("decoy_rate", None, 0.0, math.inf, "a finite number >= 0"),
        ("noise", None, 0.0, math.inf, "a finite number >= 0"),
    )
    for attr, option, lo, hi, rule in reals:
        value = getattr(spec, attr)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and lo <= value <= hi and not (attr == "censoring" and value >= 1.0)
        if not ok:
            raise ValueError(f"{shown_name(attr, option)} must be {rule}, got {value!r}")
    if spec.patients < spec.folds:
        raise ValueError(f"need at least {spec.folds} patients for {spec.folds} folds, got {spec.patients}")
    if spec.patches * spec.dim > _MAX_PATCHES_X_DIM:
        gb = spec.patches * BLOCK * spec.dim * 8 / 1e9
        raise ValueError(
            f"--patches {spec.patches} x --dim {spec.dim} is too large: one slide's x20 features "
            f"alone would take ~{gb:.1f} GB of memory; keep patches x dim <= {_MAX_PATCHES_X_DIM} "
            "(e.g. --patches 4096 --dim 1024)"
        )
