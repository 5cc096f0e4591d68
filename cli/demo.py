"""`dsca demo`: synthetic cohort -> store -> 5-fold training -> report, plus a shuffled-label
control (the same run with survival labels permuted across patients, which must stay near 0.5),
then the trained run applied: to an independent external cohort (`dsca predict`) and as
attention heatmaps of a few test slides on their synthetic whole-slide images (`dsca heatmap`),
with the attention scored against the planted motif.

The synthetic signal (see ``dsca.store.synth``): a motif in a few of the 16 x20 rows of
tumour blocks drives risk, the same motif appears in non-tumour blocks as a decoy, and x5 only
tells tissue types apart. The demo turns the signal up from the generator's default so that a
small model trained briefly on a laptop CPU can show it (the README gives the resulting
numbers and timings).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from dsca.cli._common import print_to_stderr

HELP = "synthetic cohort -> store -> 5-fold training -> report (the README's first command)"

DESCRIPTION = """\
    The whole workflow on a synthetic cohort, in a few minutes on a laptop CPU.

    Reads nothing. Writes into OUT: cohort/ (a CLAM-format cohort with a planted prognostic
    signal: coords .h5, pt_files/ and h5_files/ at both levels, labels.csv, split .npz
    files), cohort.zarr (the converted feature store), signal.yaml and signal/ (the training
    config and a dsca train output folder: metrics.json, predictions.csv, plots), and unless
    --no-control labels_shuffled.csv, control.yaml and control/ (the same run with survival
    labels permuted across patients, whose C-index must stay near 0.5).

    Then applies the signal run: external/ (an independent synthetic cohort of new patients
    in the same feature space, converted to external.zarr) scored by dsca predict into
    signal-predict/ (predictions.csv, metrics.json, km.png), and dsca heatmap of a few test
    slides of the first fold into signal-heatmaps/<slide_id>/ (attention.csv, heatmap.png,
    overlay.png on the slide image that cohort/wsi/ holds, top-k tiles, attention.geojson).

    Prints the test C-index per fold (with bootstrap intervals) of both runs, the external
    cohort's metrics and how well the attention finds the planted motif (AUROC of the
    two-scale map vs the x5 map, each fold's model on its own test slides). Rerunning with
    the same OUT overwrites it."""

EXAMPLES = """\
    dsca demo
    dsca demo --out /tmp/dsca-demo --patients 100 --epochs 3 --folds 0 --no-control
    dsca demo --device cuda
    """

log = logging.getLogger(__name__)

# Cohort and model small enough for a laptop CPU, large enough for the signal to show.
_SPEC = dict(patients=300, dim=32, patches=40, signal=2.5, noise=0.7, motif_rows=4)
_EXTERNAL_PATIENTS = 100
_HEATMAP_SLIDES = 3
_CONFIG: dict[str, Any] = {
    "dims": "32-32-32-4",
    "tra_nhead": 4,
    "dropout": 0.5,
    "opt": "adam",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "reg_l1": 0.0,
    "epochs": 10,
    "bp_every_iters": 2,
    # the demo's validation sets are small: their loss is too noisy to pick the epoch, their C-index is not
    "monitor_metrics": "ci",
    "es_patience": 5,
    "lr_patience": 3,
    "eval_bootstrap": 200,
    "num_threads": 1,
    "cache_features": True,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("dsca-demo"), metavar="DIR", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="cohort and training seed (default: %(default)s)")
    parser.add_argument("--patients", type=int, default=_SPEC["patients"], metavar="N", help="cohort size")
    parser.add_argument("--epochs", type=int, default=_CONFIG["epochs"], help="max epochs per fold")
    parser.add_argument("--folds", default="0,1,2,3,4", metavar="K[,K...]", help="comma-separated folds to run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--no-control", action="store_true", help="skip the shuffled-label control run")


def _write_config(path: Path, values: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False))


def _shuffled_labels(csv: Path, out: Path, seed: int) -> Path:
    """Permute the patient-level (t, e) across patients; slides stay with their patient."""
    import pandas as pd

    df = pd.read_csv(csv, dtype={"patient_id": str, "pathology_id": str})
    pat = df.groupby("patient_id", sort=False)[["t", "e"]].first()
    perm = np.random.default_rng(seed).permutation(len(pat))
    shuffled = pd.DataFrame(pat.to_numpy()[perm], index=pat.index, columns=["t", "e"])
    df[["t", "e"]] = shuffled.loc[df["patient_id"]].to_numpy()
    df.to_csv(out, index=False)
    return out


def run(args: argparse.Namespace) -> int:
    from dsca.config import load_config, parse_folds
    from dsca.store.convert import convert_cohort
    from dsca.store.synth import SynthSpec, write_synthetic_cohort
    from dsca.train import train_cross_validation

    t0 = time.perf_counter()
    # absolute: the training configs written below resolve relative paths against their own
    # folder, so `--out dsca-demo` would otherwise point them at dsca-demo/dsca-demo/...
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = SynthSpec(**{**_SPEC, "patients": args.patients, "seed": args.seed})
    log.info("1/6 writing a synthetic CLAM cohort of %d patients to %s", spec.patients, out / "cohort")
    cohort = write_synthetic_cohort(out / "cohort", spec)
    log.info("2/6 converting it into a dsca-store store")
    store = out / "cohort.zarr"
    report = convert_cohort(
        x5_features=cohort.x5_features, x20_features=cohort.x20_features,
        x5_coords=cohort.x5_coords, x20_coords=cohort.x20_coords, labels=cohort.labels_csv,
        out=store, overwrite=True,
    )
    if not report.ok:
        print_to_stderr(report.lines())
        return 1
    split_pattern = str(cohort.splits[0]).replace("fold0", "fold{}")
    folds = parse_folds(args.folds, "--folds")
    base = {**_CONFIG, "store": str(store.resolve()), "splits": split_pattern, "epochs": args.epochs,
            "seed": args.seed, "folds": folds, "device": args.device}
    runs = {"signal": cohort.labels_csv}
    if not args.no_control:
        runs["control"] = _shuffled_labels(cohort.labels_csv, out / "labels_shuffled.csv", args.seed)
    reports = {}
    for step, (name, labels) in enumerate(runs.items(), start=3):
        cfg_path = out / f"{name}.yaml"
        _write_config(cfg_path, {**base, "labels": str(Path(labels).resolve())})
        log.info("%d/6 training %s (%s)", step, name, cfg_path)
        reports[name] = train_cross_validation(load_config(cfg_path), out / name, overwrite=True)
    if any(r["summary"]["n_folds_failed"] for r in reports.values()):
        _print_report(reports, out, time.perf_counter() - t0)
        return 1
    applied = _apply_signal_run(out, spec, cohort, store, folds, args.device)
    _print_report(reports, out, time.perf_counter() - t0, applied)
    return 0


def _apply_signal_run(out: Path, spec: Any, cohort: Any, store: Path, folds: list[int],
                      device: str) -> dict[str, Any]:
    """`dsca predict` on an external cohort, `dsca heatmap` on a few test slides, and the
    attention's AUROC for the planted motif; returns what the report prints."""
    import dataclasses

    from dsca.infer import load_run_models, predict_run
    from dsca.infer.heatmap import heatmap_run, slide_attention, slide_patients
    from dsca.infer.truth import motif_auroc
    from dsca.splits import load_split
    from dsca.store import FeatureStore
    from dsca.store.convert import convert_cohort
    from dsca.store.synth import write_synthetic_cohort
    from dsca.store.synth_wsi import write_slide_images
    from dsca.train.device import resolve_device

    run = out / "signal"
    # new patients, the same planted vectors (the same "encoder"): an external validation cohort
    external_spec = dataclasses.replace(spec, patients=_EXTERNAL_PATIENTS, seed=spec.seed + 1,
                                        pattern_seed=spec.seed)
    log.info("5/6 applying the signal run to an external cohort of %d new patients", external_spec.patients)
    external = write_synthetic_cohort(out / "external", external_spec)
    report = convert_cohort(
        x5_features=external.x5_features, x20_features=external.x20_features,
        x5_coords=external.x5_coords, x20_coords=external.x20_coords, labels=external.labels_csv,
        out=out / "external.zarr", overwrite=True,
    )
    if not report.ok:  # our own synthetic files: a failure is a bug
        raise RuntimeError(f"converting the external cohort failed: {list(report.lines())[:3]}")
    predicted = predict_run(run, out / "external.zarr", out / "signal-predict",
                            labels_csv=external.labels_csv, device=device)

    log.info("6/6 attention heatmaps of test slides, and the attention against the planted motif")
    fs = FeatureStore.open(store)
    models = load_run_models(run)
    by_name = {m.name: m for m in models}
    # each fold's model on its own test slides: attention where the model did not learn
    attentions = []
    for fold in folds:
        test = load_split(cohort.splits[fold]).test
        mapping, slides = slide_patients(fs, None, test, None, str(store))
        attentions.extend(slide_attention([by_name[f"fold{fold}"]], store, mapping, slides,
                                          resolve_device(device)))
    auroc = motif_auroc(attentions, cohort.root)
    first_test = load_split(cohort.splits[folds[0]]).test
    shown = [s for pid in first_test for s in fs.patient_slides().get(pid, [])][:_HEATMAP_SLIDES]
    write_slide_images(cohort.root, shown, progress=False)
    # the first fold's model alone: these are its test slides
    heatmap_run(run, store, out / "signal-heatmaps", slides=shown, wsi_dir=cohort.root / "wsi",
                device=device, models=[f"fold{folds[0]}"])
    return {"external": predicted, "auroc": auroc, "heatmaps": out / "signal-heatmaps", "shown": shown}


def _print_report(reports: dict[str, dict[str, Any]], out: Path, seconds: float,
                  applied: dict[str, Any] | None = None) -> None:
    names = list(reports)
    folds = [f["fold"] for f in reports["signal"]["folds"]]
    print()
    print(f"{'fold':>6} " + " ".join(f"{'test C-index (' + n + ')':>24}" for n in names))
    for i, k in enumerate(folds):
        cells = []
        for n in names:
            f = reports[n]["folds"][i].get("test")
            cells.append(f"{f['cindex']:.3f} [{f['cindex_ci_low']:.2f}, {f['cindex_ci_high']:.2f}]"
                         if f else "failed")
        print(f"{k:>6} " + " ".join(f"{c:>24}" for c in cells))
    print(f"{'mean':>6} " + " ".join(
        f"{reports[n]['summary']['test_cindex_mean']:.3f} +- {reports[n]['summary']['test_cindex_std']:.3f}".rjust(24)
        for n in names))
    s = reports["signal"]["summary"]
    nan = float("nan")
    print(f"\nsignal: test C-index {s['test_cindex_mean']:.3f} (target >= 0.70), "
          f"binned {s.get('test_cindex_discrete_mean', nan):.3f}, td-AUC {s.get('test_td_auc_mean', nan):.3f}, "
          f"IBS {s.get('test_ibs_mean', float('nan')):.3f}, risk groups: log-rank p "
          f"{s.get('test_pooled_logrank_p', float('nan')):.2g}, HR "
          f"{s.get('test_pooled_hazard_ratio', float('nan')):.2f}")
    if "control" in reports:
        print(f"control (shuffled labels): test C-index {reports['control']['summary']['test_cindex_mean']:.3f} "
              "(expected near 0.5)")
    if applied is not None:
        e, a = applied["external"], applied["auroc"]
        nan = float("nan")
        print(f"external cohort ({e['n']} new patients, dsca predict): C-index {e['cindex']:.3f} "
              f"[{e.get('cindex_ci_low', nan):.2f}, {e.get('cindex_ci_high', nan):.2f}], td-AUC "
              f"{e.get('td_auc', nan):.3f}, IBS {e.get('ibs', nan):.3f}, log-rank p "
              f"{e['logrank_p']:.2g}, HR {e['hazard_ratio']:.2f}")
        print(f"attention vs the planted motif ({a['n_motif']} motif sub-patches of {a['n_subpatches']} "
              f"in {a['n_slides']} test slides): AUROC two-scale score {a['score']:.3f}, CAPool cross "
              f"{a['cross']:.3f}, x5 map {a['pool']:.3f}; in tumour blocks {a['score_tumour']:.3f} / "
              f"{a['cross_tumour']:.3f} / {a['pool_tumour']:.3f}")
    for n in names:
        print(f"{n}: {out / n / 'metrics.json'}, {out / n / 'km_test.png'}, {out / n / 'training_curves.png'}")
    if applied is not None:
        print(f"predict: {out / 'signal-predict'}; heatmaps: {applied['heatmaps']} "
              f"({', '.join(applied['shown'])})")
    print(f"total {seconds / 60:.1f} min")
