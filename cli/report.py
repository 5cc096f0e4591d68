"""`dsca report`: a run's metrics and plots recomputed from its saved predictions."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "recompute a run's metrics and plots from its predictions.csv and check its metrics.json"

DESCRIPTION = """\
    Recompute every metric and plot of a dsca train run from its saved predictions.

    Reads RUN/config.yaml, RUN/predictions.csv and each RUN/fold<k>/result.json (bin edges,
    status, best epoch, history) of a finished or partly finished run. Per fold, the
    train/val/test metrics (C-index with its bootstrap CI, td-AUC, IBS, loss, log-rank p and
    hazard ratio of the risk groups) come from the prediction rows, the risk groups from the
    risk at the median of the fold's training rows (checked against the saved risk_group);
    then the summary over folds and the pooled test risk groups.

    Writes OUT/metrics.json, OUT/km_test.png and OUT/training_curves.png, prints the test
    metrics per fold and compares the result with RUN/metrics.json: exit status 0 when every
    metric matches (relative 1e-9), 1 when some differ (each is listed), 2 on bad input.

    --predictions CSV --labels CSV does the same for the output of dsca predict: its
    metrics.json and km.png recomputed from predictions.csv (with the predict.json beside it)
    and the labels, compared with the metrics.json beside the predictions when there is one."""

EXAMPLES = """\
    dsca report --run runs/brca
    dsca report --run runs/brca --out /tmp/brca-report
    dsca report --predictions pred/external/predictions.csv --labels external.csv --out pred/report
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # One input mode per option of this group; more modes join it, and run() requires one.
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", type=Path, metavar="RUN",
                      help="a dsca train output folder (required: there is no default input)")
    mode.add_argument("--predictions", type=Path, metavar="CSV",
                      help="predictions.csv of dsca predict, with --labels (default: report on --run)")
    parser.add_argument("--labels", type=Path, metavar="CSV",
                        help="with --predictions: labels CSV (pathology_id, patient_id, t, e) (default: none)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for the recomputed files (default: RUN/report, or report/ "
                             "beside the predictions)")


def run(args: argparse.Namespace) -> int:
    from dsca.train.recompute import ReportError, compare_reports, recompute_report

    if args.predictions is not None:
        return _report_predictions(args)
    if args.labels is not None:
        return _error("--labels goes with --predictions CSV")
    if args.run is None:
        return _error("give the run folder to report on: --run RUN, or --predictions CSV --labels CSV")
    saved_path = args.run / "metrics.json"
    try:
        saved = _read_saved(saved_path)  # first: a bad one stops the command before it writes
        report = recompute_report(args.run, args.out)
    except ReportError as err:
        return _error(str(err))
    _print_table(report)
    out = args.out if args.out is not None else args.run / "report"
    print(f"written: {out / 'metrics.json'}, km_test.png, training_curves.png")
    if saved is None:
        print(f"{saved_path}: absent; nothing to compare with")
        return 0
    diffs = compare_reports(saved, report)
    if not diffs:
        print(f"matches {saved_path}")
        return 0
    print(f"{len(diffs)} value(s) differ from {saved_path}:")
    for line in diffs:
        print(f"  {line}")
    return 1


def _report_predictions(args: argparse.Namespace) -> int:
    from dsca.infer.predict import report_predictions
    from dsca.labels import LabelError

    if args.labels is None:
        return _error("--predictions needs --labels CSV (the patients' t and e)")
    out = args.out if args.out is not None else args.predictions.parent / "report"
    saved_path = args.predictions.parent / "metrics.json"
    try:
        saved = _read_saved(saved_path)
        found = report_predictions(args.predictions, args.labels, out)
    except (ValueError, LabelError) as err:
        return _error(str(err))
    print(f"C-index {_num(found['cindex'])} [{_num(found.get('cindex_ci_low'))}, "
          f"{_num(found.get('cindex_ci_high'))}], td-AUC {_num(found.get('td_auc'))}, IBS "
          f"{_num(found.get('ibs'))}, log-rank p {_num(found['logrank_p'], '.2g')}, HR "
          f"{_num(found['hazard_ratio'], '.2f')}, n {found['n']}; written: {out / 'metrics.json'}, km.png")
    if saved is None:
        return 0
    from dsca.train.report import jsonable

    found = jsonable(found)
    diffs = [k for k, v in saved.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and (not isinstance(found.get(k), (int, float)) or abs(found[k] - v) > 1e-9 * max(1.0, abs(v)))]
    if diffs:
        print(f"{len(diffs)} value(s) differ from {saved_path}: {', '.join(diffs)}")
        return 1
    print(f"matches {saved_path}")
    return 0


def _error(message: str) -> int:
    print(f"dsca report: error: {message}", file=sys.stderr)
    return 2


def _read_saved(path: Path) -> dict[str, Any] | None:
    """The run's own metrics.json; None when the run has written none yet."""
    from dsca.train.recompute import ReportError

    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: unreadable ({err})") from None
    if not isinstance(saved, dict):
        raise ReportError(f"{path}: not a metrics.json (expected an object)")
    return saved


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _print_table(report: dict[str, Any]) -> None:
    """Test C-index [95% CI], td-AUC and IBS per fold, then the summary line."""
    print(f"{'fold':>4}  {'test C-index [95% CI]':<24} {'td-AUC':>6} {'IBS':>6}  status")
    for f in report["folds"]:
        t = f.get("test") or {}
        ci = f"{_num(t.get('cindex'))} [{_num(t.get('cindex_ci_low'))}, {_num(t.get('cindex_ci_high'))}]" \
            if t else "-"
        status = f.get("status", "")
        if status != "ok" and f.get("reason"):
            status = f"{status}: {f['reason']}"
        print(f"{f['fold']:>4}  {ci:<24} {_num(t.get('td_auc')):>6} {_num(t.get('ibs')):>6}  {status}")
    s = report["summary"]

    def pm(key: str) -> str:
        return f"{_num(s.get(f'{key}_mean'))} +- {_num(s.get(f'{key}_std'))}"

    line = f"mean over {s['n_folds']} fold(s): C-index {pm('test_cindex')}, td-AUC {pm('test_td_auc')}"
    if "test_ibs_mean" in s:  # the Cox head has no survival curve to score
        line += f", IBS {pm('test_ibs')}"
    if "test_pooled_logrank_p" in s:
        line += (f"; pooled test log-rank p {_num(s['test_pooled_logrank_p'], '.2g')}, "
                 f"HR {_num(s.get('test_pooled_hazard_ratio'), '.2f')}")
    if s.get("n_folds_failed"):
        line += f"; {s['n_folds_failed']} fold(s) failed"
    print(line)
