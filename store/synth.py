"""A synthetic cohort in CLAM's on-disk layout, with a prognostic signal that needs both streams.

Each slide is a few blob-shaped tissue regions on CLAM's level-2 patch lattice. Inside the
tissue, tumour nests sit in stroma and "other" tissue; the x5 feature of a patch is its tissue
prototype plus noise. Every x5 patch owns a 4x4 block of x20 rows (texture of the same tissue
plus noise); in some blocks a few of the 16 rows also carry a motif vector. Only the motif in
TUMOUR blocks drives risk (its rate per patient varies), while the same motif also appears in
non-tumour blocks at a fixed rate (a decoy). So x5 alone carries no signal (tumour fraction is
independent of risk), x20 alone sees a diluted one, and both together recover it.

Layout written under `out_dir` (names as the reference's tutorial uses them)::

    tiles-l2-s256/patches/<sid>.h5 + process_list_autogen.csv     level-2 coords
    tiles-l1-s256/patches/<sid>.h5 + process_list_autogen.csv     made by dsca-store align
    feats-l2-s256-synth/{pt_files,h5_files}/<sid>.{pt,h5}         x5 features
    feats-l1-s256-synth/{pt_files,h5_files}/<sid>.{pt,h5}         x20 features (16 rows/patch)
    synth_path_full.csv                                           pathology_id,patient_id,e,t
    splits/synth-seed<S>-fold<k>.npz                              train/val/test patients
    truth.csv, patterns.npz                                       hidden risk, planted vectors
    tissue/<sid>.npz                                              per-slide truth: tissue type per
                                                                  x5 patch, motif per x20 row
    wsi/<sid>.tiff                                                only with ``wsi=True``: a small
                                                                  pyramidal TIFF of the slide
    preview.png                                                   tissue maps of the first slides
    synth_spec.json, .dsca-synth                                  the spec; the cohort's marker

`out_dir` must be new, empty, or a cohort that synth wrote before (it has the ``.dsca-synth``
marker, written first, or - cohorts of earlier versions - ``truth.csv``, ``patterns.npz`` and
``synth_spec.json``): synth never writes over a folder of someone's own files. Rewriting a
previous cohort first removes synth's own outputs listed above (so that a smaller rerun leaves
no stale slides behind) and keeps everything else in the folder.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dsca.atomic import atomic_write
from dsca.coords import BLOCK
from dsca.splits import Split, write_splits
from dsca.store.align import align_dir
from dsca.store.clam import write_coords
from dsca.store.synth_spec import SynthSpec, check_spec

__all__ = ["SynthSpec", "SynthCohort", "write_synthetic_cohort", "check_spec", "is_synth_cohort", "TISSUES",
           "MARKER", "PATCH_SIZE", "TISSUE_DIR", "WSI_DIR"]

log = logging.getLogger(__name__)

TISSUES = ("tumour", "stroma", "other")
PATCH_SIZE = 256
_LEVEL = 2
# Real SVS pyramids have slightly non-integer, per-axis downsamples.
_DOWNSAMPLE = (16.001219, 16.000924)
_PREVIEWS = 4  # slides drawn in preview.png

#: File that marks a folder as a cohort written by synth (written before anything else).
MARKER = ".dsca-synth"
# What cohorts written before the marker existed always hold.
_LEGACY_MARKERS = ("truth.csv", "patterns.npz", "synth_spec.json")
#: Folders of the per-slide truth (tissue/<slide_id>.npz) and the slide images (wsi/).
TISSUE_DIR = "tissue"
WSI_DIR = "wsi"
# synth's own outputs, removed before a previous cohort is rewritten (folders, then files).
# wsi/ is synth's too: images of a previous cohort would not match the rewritten coords.
_OWN_DIRS = (f"tiles-l2-s{PATCH_SIZE}", f"tiles-l1-s{PATCH_SIZE}", f"feats-l2-s{PATCH_SIZE}-synth",
             f"feats-l1-s{PATCH_SIZE}-synth", TISSUE_DIR, WSI_DIR)
_OWN_FILES = ("synth_path_full.csv", "truth.csv", "patterns.npz", "preview.png", "synth_spec.json")
# Files a desktop puts into any folder it shows; they do not make a folder "not empty".
_NOISE = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class SynthCohort:
    """Paths of a written cohort (see the module docstring) and its hidden truth."""

    root: Path
    x5_coords: Path
    x20_coords: Path
    x5_features: Path
    x20_features: Path
    labels_csv: Path
    splits: list[Path]
    truth_csv: Path
    spec: SynthSpec
    slide_ids: list[str] = field(default_factory=list)
    wsi_dir: Path | None = None


def _tissue_mask(rng: np.random.Generator, n_target: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells (col, row) inside 1-3 noisy elliptical blobs; about `n_target` of them."""
    n_blobs = int(rng.integers(1, 4))
    side = int(np.ceil(np.sqrt(n_target * 3.0))) + 6
    cols, rows = np.meshgrid(np.arange(side), np.arange(side), indexing="xy")
    field_ = np.full(cols.shape, -np.inf)
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.25, 0.75, size=2) * side
        ax, ay = rng.uniform(0.5, 1.0, size=2)
        theta = rng.uniform(0, np.pi)
        dx, dy = cols - cx, rows - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / ax
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ay
        field_ = np.maximum(field_, -np.hypot(u, v) + rng.normal(0, 0.6, size=cols.shape))
    # the threshold that keeps n_target cells gives blobs of the wanted total size
    order = np.sort(field_.ravel())[::-1]
    keep = field_ >= order[min(n_target, order.size) - 1]
    return cols[keep], rows[keep]


def _tissue_types(rng: np.random.Generator, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """0 = tumour nests around a few seeds, 1 = stroma ring, 2 = other tissue."""
    n = len(cols)
    n_seeds = int(rng.integers(1, 4))
    seeds = rng.choice(n, size=min(n_seeds, n), replace=False)
    d = np.min(np.hypot(cols[:, None] - cols[seeds], rows[:, None] - rows[seeds]), axis=1)
    radius = rng.uniform(2.0, 0.45 * np.sqrt(n) + 2.0)
    types = np.where(d <= radius, 0, np.where(d <= radius + 2.5, 1, 2))
    return types.astype(np.int64)


def _write_features(root: Path, sid: str, x: np.ndarray, coords: np.ndarray, h5_files: bool) -> None:
    (root / "pt_files").mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(x), root / "pt_files" / f"{sid}.pt")
    if h5_files:
        (root / "h5_files").mkdir(parents=True, exist_ok=True)
        with h5py.File(root / "h5_files" / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=coords.astype(np.int64))


def _write_tissue(path: Path, types: np.ndarray, motif_rows: np.ndarray, coords: np.ndarray) -> None:
    """One slide's truth: `types` [N] tissue index (see TISSUES), `motif_rows` [N, 16] (row
    4*r + c of each block carries the motif), `coords` [N, 2] x5 level-0 corners in the order of
    the slide's coords file."""
    with atomic_write(path, "wb") as f:
        np.savez(f, types=types.astype(np.int8), motif=motif_rows.astype(bool), coords=coords.astype(np.int64))


def _censor_to_rate(rng: np.random.Generator, t_event: np.ndarray, rate: float) -> np.ndarray:
    """Uniform(0, c_max) censoring times, c_max chosen so that ~`rate` are censored."""
    u = rng.uniform(size=t_event.shape)
    lo, hi = float(t_event.min()) * 0.5, float(t_event.max()) * 50.0
    for _ in range(60):  # bisection on c_max: the censored fraction decreases as c_max grows
        mid = np.sqrt(lo * hi)
        if np.mean(u * mid < t_event) > rate:
            lo = mid
        else:
            hi = mid
    return u * np.sqrt(lo * hi)


def write_synthetic_cohort(out_dir: str | Path, spec: SynthSpec = SynthSpec(), progress: bool = True,
                           wsi: bool = False) -> SynthCohort:
    """Write a deterministic synthetic cohort in CLAM's layout; see the module docstring.

    Args:
        out_dir: a new or empty folder, or a cohort synth wrote before (rewritten).
        spec: size and signal; checked by :func:`check_spec` before anything is written.
        progress: show a progress bar.
        wsi: also write a small pyramidal TIFF per slide under ``wsi/``
            (:func:`dsca.store.synth_wsi.write_slide_images`); every other file is the same
            with or without it.

    Raises:
        ValueError: a spec out of bounds (naming the option), or an `out_dir` that is a file or
            a non-empty folder that is not a previous synthetic cohort.
    """
    check_spec(spec)
    root = Path(out_dir)
    _prepare_out(root)
    rng = np.random.default_rng(spec.seed)
    l2 = root / f"tiles-l2-s{PATCH_SIZE}"
    l1 = root / f"tiles-l1-s{PATCH_SIZE}"
    f2 = root / f"feats-l2-s{PATCH_SIZE}-synth"
    f1 = root / f"feats-l1-s{PATCH_SIZE}-synth"
    (l2 / "patches").mkdir(parents=True, exist_ok=True)
    (root / TISSUE_DIR).mkdir(exist_ok=True)

    d = spec.dim
    # orthonormal directions, so that tissue texture never leaks into the motif read-out
    unit = np.linalg.qr(rng.normal(size=(d, 7)))[0].T
    if spec.pattern_seed is not None:
        # drawn after the draw above, which keeps the main stream (and so the patients) as
        # they are for the same seed
        unit = np.linalg.qr(np.random.default_rng(spec.pattern_seed).normal(size=(d, 7)))[0].T
    proto_x5, proto_x20, motif = 2.0 * unit[:3], 2.0 * unit[3:6], 3.0 * unit[6]

    # per-patient tumour-motif rate drives risk; its spread is what the model must read
    rate = rng.beta(2.0, 3.0, size=spec.patients)
    # the decoy rate also varies by patient, independently of risk: x20 alone averages both
    decoy = rng.uniform(0.0, 2.0 * spec.decoy_rate, size=spec.patients).clip(0.0, 1.0)
    risk = spec.signal * (rate - rate.mean()) / (rate.std() + 1e-12)
    scale_days = 900.0
    t_event = scale_days * rng.weibull(1.3, size=spec.patients) * np.exp(-risk / 1.3)
    t_cens = _censor_to_rate(rng, t_event, spec.censoring)
    t_obs = np.maximum(1, np.rint(np.minimum(t_event, t_cens))).astype(np.int64)
    event = (t_event <= t_cens).astype(np.int64)

    label_rows, truth_rows, process_rows, slide_ids = [], [], [], []
    previews: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    step = (PATCH_SIZE * np.asarray(_DOWNSAMPLE)).astype(np.int64)  # CLAM's level-0 grid step
    for p in tqdm(range(spec.patients), desc="synth", unit="patient", disable=None if progress else True):
        pid = f"SYN-{p:04d}"
        n_slides = 1 if rng.uniform() >= spec.multi_slide else int(rng.integers(2, 4))
        tumour_blocks = motif_tumour = 0
        for k in range(n_slides):
            sid = f"{pid}-01Z-00-DX{k + 1}"
            n = max(8, int(rng.poisson(spec.patches)))
            cols, rows = _tissue_mask(rng, n)
            types = _tissue_types(rng, cols, rows)
            n = len(cols)
            origin = rng.integers(2, 40, size=2) * 97  # tissue does not start at the slide corner
            coords = origin[None, :] + np.stack([cols, rows], axis=1) * step[None, :]
            order = np.lexsort((coords[:, 0], coords[:, 1]))  # CLAM walks row by row
            coords, types = coords[order], types[order]

            x5 = proto_x5[types] + spec.noise * rng.normal(size=(n, d))
            x20 = proto_x20[types][:, None, :] + spec.noise * rng.normal(size=(n, BLOCK, d))
            p_block = np.where(types == 0, rate[p], decoy[p])
            positive = rng.uniform(size=n) < p_block
            motif_rows = np.zeros((n, BLOCK), dtype=bool)
            for i in np.flatnonzero(positive):
                # the same draw as always (the RNG stream defines every cohort), now also recorded
                rows_i = rng.choice(BLOCK, size=spec.motif_rows, replace=False)
                x20[i, rows_i] += motif
                motif_rows[i, rows_i] = True
            if len(previews) < _PREVIEWS:
                previews.append((sid, coords // step, types, positive))
            tumour_blocks += int(np.sum(types == 0))
            motif_tumour += int(np.sum(positive & (types == 0)))

            # the level's own size in its pixels, as CLAM records it (the slide ends a margin
            # past the tissue)
            w, h = np.ceil((coords.max(axis=0) + step + origin) / np.asarray(_DOWNSAMPLE)).astype(np.int64)
            attrs = {
                "patch_size": PATCH_SIZE,
                "patch_level": _LEVEL,
                "downsample": np.asarray(_DOWNSAMPLE),
                "downsampled_level_dim": np.array([w, h], dtype=np.int64),
                "level_dim": np.array([w, h], dtype=np.int64),
                "name": sid,
                "save_path": str(l2 / "patches"),
            }
            write_coords(l2 / "patches" / f"{sid}.h5", coords, attrs)
            _write_tissue(root / TISSUE_DIR / f"{sid}.npz", types, motif_rows, coords)
            _write_features(f2, sid, x5.astype(np.float32), coords, spec.h5_files)
            # x20 coords come from our own aligner below; features follow its row order
            x20_rows = x20.reshape(n * BLOCK, d).astype(np.float32)
            with atomic_write(root / f".x20-{sid}.npy", "wb") as f:
                np.save(f, x20_rows)
            label_rows.append((sid, pid, int(event[p]), int(t_obs[p])))
            process_rows.append({"slide_id": f"{sid}.svs", "process": 1, "status": "processed",
                                 "seg": 1, "patch": 1, "patch_level": _LEVEL, "patch_size": PATCH_SIZE})
            slide_ids.append(sid)
        truth_rows.append({"patient_id": pid, "risk": risk[p], "motif_rate": rate[p], "decoy_rate": decoy[p],
                           "tumour_blocks": tumour_blocks, "tumour_motif_blocks": motif_tumour,
                           "t_event": t_event[p], "t_censor": t_cens[p]})

    pd.DataFrame(process_rows).to_csv(l2 / "process_list_autogen.csv", index=False)
    report = align_dir(l2, l1, level=1, progress=False)
    if not report.ok:  # our own output: a failure here is a bug, not bad input
        raise RuntimeError(f"aligning synthetic coords failed: {report.failures[:3]}")
    for sid in slide_ids:
        tmp = root / f".x20-{sid}.npy"
        with h5py.File(l1 / "patches" / f"{sid}.h5", "r") as f:
            x20_coords = f["coords"][()]
        _write_features(f1, sid, np.load(tmp), x20_coords, spec.h5_files)
        tmp.unlink()

    labels_csv = root / "synth_path_full.csv"
    pd.DataFrame(label_rows, columns=["pathology_id", "patient_id", "e", "t"]).to_csv(labels_csv, index=False)
    truth_csv = root / "truth.csv"
    pd.DataFrame(truth_rows).to_csv(truth_csv, index=False)
    # the planted pattern itself, for oracle checks of the signal
    np.savez(root / "patterns.npz", proto_x5=proto_x5, proto_x20=proto_x20, motif=motif,
             tissues=np.asarray(TISSUES))
    _plot_previews(root / "preview.png", previews)
    splits = _write_splits(root / "splits", [r["patient_id"] for r in truth_rows], event, spec)
    (root / "synth_spec.json").write_text(pd.Series(asdict(spec)).to_json(indent=1))
    wsi_dir = None
    if wsi:
        # lazy: tifffile is only needed for the images
        from dsca.store.synth_wsi import write_slide_images

        write_slide_images(root, slide_ids, progress=progress)
        wsi_dir = root / WSI_DIR
    return SynthCohort(root, l2, l1, f2, f1, labels_csv, splits, truth_csv, spec, slide_ids, wsi_dir)


def is_synth_cohort(folder: str | Path) -> bool:
    """Whether `folder` holds a cohort written by :func:`write_synthetic_cohort` (its marker, or
    the files that cohorts of earlier versions always hold)."""
    root = Path(folder)
    return (root / MARKER).is_file() or all((root / f).is_file() for f in _LEGACY_MARKERS)


def _prepare_out(root: Path) -> None:
    """Make `root` ready for a cohort: refuse a file or someone's folder; clear synth's own
    outputs of a previous cohort; write the marker first (so that an interrupted run is a
    cohort too)."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder; give a new or empty folder for the cohort")
    if root.is_dir():
        entries = sorted(p.name for p in root.iterdir() if p.name not in _NOISE)
        if entries and not is_synth_cohort(root):
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise ValueError(
                f"{root} is not empty ({shown}) and is not a synthetic cohort written before (no "
                f"{MARKER} marker); refusing to write over it: give a new or empty folder"
            )
        if entries:
            log.info("%s: rewriting the synthetic cohort there", root)
            for d in _OWN_DIRS:
                if (root / d).is_dir() and not (root / d).is_symlink():
                    shutil.rmtree(root / d)
            for f in _OWN_FILES:
                if (root / f).is_file():
                    (root / f).unlink()
            for f in [*root.glob(".x20-*.npy"), *root.glob("splits/synth-seed*-fold*.npz")]:
                f.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(
        "A synthetic cohort written by dsca-store synth (dsca.store.synth); synth may rewrite "
        "this folder.\n"
    )


def _plot_previews(path: Path, previews: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Tissue maps of the first slides: tissue type per x5 patch, motif blocks outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#c0392b", "#f5b7b1", "#d7bde2"])  # tumour, stroma, other (H&E-ish)
    fig, axes = plt.subplots(1, len(previews), figsize=(3.2 * len(previews), 3.4), squeeze=False)
    for ax, (sid, grid, types, positive) in zip(axes[0], previews):
        g = grid - grid.min(axis=0)
        canvas = np.full((g[:, 1].max() + 1, g[:, 0].max() + 1), np.nan)
        canvas[g[:, 1], g[:, 0]] = types
        ax.imshow(canvas, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.scatter(g[positive, 0], g[positive, 1], s=6, c="k", marker="s", label="motif block")
        ax.set_title(sid, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="lower left", fontsize=6)
    fig.suptitle("synthetic slides: tumour (red), stroma (pink), other (lilac); black = x20 motif", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_splits(folder: Path, patients: list[str], event: np.ndarray, spec: SynthSpec) -> list[Path]:
    """K folds stratified by event: fold k tests one part, validates on 1/(K-1) of the rest.

    The files go through :func:`dsca.splits.write_splits` (the one writer of the split format).
    The fold assignment stays this simpler event-only scheme rather than
    :func:`dsca.splits.make_splits` (which also stratifies by time bin): the demo's folds, and
    so the README's demo numbers, are defined by it.
    """
    rng = np.random.default_rng(spec.seed + 1)
    ids = np.asarray(patients)
    part = np.empty(len(ids), dtype=np.int64)
    for e in (0, 1):
        idx = rng.permutation(np.flatnonzero(event == e))
        part[idx] = np.arange(len(idx)) % spec.folds
    splits = []
    for k in range(spec.folds):
        rest = rng.permutation(ids[part != k])
        n_val = max(1, len(rest) // (spec.folds - 1)) if spec.folds > 1 else 0
        splits.append(Split(train=rest[n_val:].tolist(), val=rest[:n_val].tolist(),
                            test=ids[part == k].tolist()))
    return write_splits(splits, folder, f"synth-seed{spec.seed}")
