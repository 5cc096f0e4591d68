#!/usr/bin/env bash
# CAPool on a CUDA machine: kernel tests without the interpreter, then the GPU benchmarks, then
# a markdown table of the results. Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh            # OUT defaults to ./gpu_check_out
#
# Assumes a python3 that already has a CUDA build of torch, triton, pytest and pytest-benchmark
# (as on the project's GPU image, which has no network): dsca itself is installed with
# --no-deps. DTYPES=bf16 (default) or "bf16 fp32" picks the benchmarked dtypes.
# Every CUDA branch of dsca runs once: kernel tests, whole-model Triton vs torch equality,
# training with bf16 and fp16 autocast, --resume after a kill -9, torch.compile of the model,
# cuda:1 when a second GPU exists, train and predict under torchrun (nccl), dsca profile. Missing optional pieces are skipped and said.
# Writes under $OUT: env.txt, kernel_tests.txt/.xml, capool_bench.json, capool_bench.txt,
# capool_table.md (also printed), capool_table.png, train_step.json, compile.json,
# second_gpu.json, train_{bf16,fp16,resume,cuda1,nccl}.txt, predict_nccl.txt, profile_{torch,triton}.txt/.json,
# summary.md and summary.json (pass/fail of every check and goal).
set -uo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
DTYPES="${DTYPES:-bf16}"
mkdir -p "$OUT"
status=0
checks=""
record() {  # record NAME STATUS: one line of the summary (any status but pass/skipped fails)
  checks="$checks$1 $2"$'\n'
  [ "$2" = pass ] || [ "$2" = skipped ] || status=1
}
outcome() { [ "$1" -eq 0 ] && echo pass || echo FAIL; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__); print("gpu", torch.cuda.get_device_name(0),
"sm_%d%d" % torch.cuda.get_device_capability(0))'
} 2>&1 | tee "$OUT/env.txt"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
  echo "gpu_check: torch sees no CUDA device" >&2; exit 2; }

# --- install dsca (no dependency resolution: the machine cannot download anything) -------------
if ! "$PY" -c 'import dsca.kernels' 2>/dev/null; then
  if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/pip.txt" 2>&1; then
    # fall back to a shadow tree with the same package mapping as setup.py
    shadow="$(mktemp -d)/dsca"
    mkdir -p "$shadow"
    for f in dsca/*; do ln -s "$PWD/$f" "$shadow/"; done
    ln -s "$PWD/kernels" "$shadow/kernels"
    ln -s "$PWD/store" "$shadow/store"
    ln -s "$PWD/cli" "$shadow/cli"
    export PYTHONPATH="$(dirname "$shadow")${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: pip install failed (see pip.txt); using shadow package at $shadow"
  fi
fi

# --- kernel tests on the GPU (TRITON_INTERPRET=0 overrides the test suite's default of 1) --------
TRITON_INTERPRET=0 "$PY" -m pytest tests/kernels -q -p no:cacheprovider \
  --junitxml="$OUT/kernel_tests.xml" 2>&1 | tee "$OUT/kernel_tests.txt"
record kernel-tests "$(outcome "${PIPESTATUS[0]}")"

# --- benchmarks ---------------------------------------------------------------------------------
sel="cuda and ($(echo "$DTYPES" | sed 's/ / or /g'))"
TRITON_INTERPRET=0 "$PY" -m pytest benchmarks/test_bench_capool.py --benchmark-only \
  -p no:cacheprovider -k "$sel" --benchmark-max-time=0.5 --benchmark-warmup=on \
  --benchmark-json="$OUT/capool_bench.json" 2>&1 | tee "$OUT/capool_bench.txt"
record capool-bench "$(outcome "${PIPESTATUS[0]}")"

# --- markdown table ------------------------------------------------------------------------------
"$PY" - "$OUT/capool_bench.json" "$OUT/capool_table.md" <<'PYEOF'
import json
import sys

import torch

src, dst = sys.argv[1], sys.argv[2]
data = json.load(open(src))
rows: dict[str, dict[str, dict]] = {}
for b in data["benchmarks"]:
    rows.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b
gpu = torch.cuda.get_device_name(0)
lines = [
    f"# CAPool on {gpu}",
    "",
    f"torch {torch.__version__}, C = 384, 4 heads; median of pytest-benchmark rounds;",
    "speed-up = plain time / time; peak = peak CUDA memory of one call (MiB).",
    "",
    "| case | impl | median ms | vs plain | vs compiled | peak MiB | peak / plain |",
    "|---|---|---:|---:|---:|---:|---:|",
]
goals = []
for group, by in rows.items():
    plain = by.get("plain")
    comp = by.get("compiled")
    for impl in ("plain", "folded", "compiled", "triton"):
        if impl not in by:
            continue
        b = by[impl]
        t = b["stats"]["median"]
        peak = b["extra_info"].get("peak_mib")
        sp = plain["stats"]["median"] / t if plain else float("nan")
        sc = comp["stats"]["median"] / t if comp else float("nan")
        pr = peak / plain["extra_info"]["peak_mib"] if plain and peak else float("nan")
        pc = peak / comp["extra_info"]["peak_mib"] if comp and peak else float("nan")
        lines.append(f"| {group} | {impl} | {t * 1e3:.3f} | {sp:.2f}x | {sc:.2f}x | {peak:.1f} | {pr:.2f} |")
        if group == "cuda-bfloat16-fwdbwd-M4096" and impl == "triton":
            goals = [
                f"- fwd+bwd, M=4096, bf16: Triton vs plain {sp:.2f}x (goal >= 5x: {'met' if sp >= 5 else 'NOT met'})",
                f"- Triton vs torch.compile(folded) {sc:.2f}x (goal >= 1.3x: {'met' if sc >= 1.3 else 'NOT met'})",
                f"- peak memory vs plain {pr:.2f} (goal <= 0.5: {'met' if pr <= 0.5 else 'NOT met'})",
                f"- peak memory vs torch.compile(folded) {pc:.2f} (goal <= 0.5: {'met' if pc <= 0.5 else 'NOT met'})",
            ]
lines += ["", "## Goals (issue 4)", *(goals or ["- the M=4096 bf16 fwd+bwd case did not run"])]
open(dst, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

# time vs M per implementation, one panel per (dtype, mode)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

panels = sorted({g.rsplit("-M", 1)[0] for g in rows})
fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
for ax, panel in zip(axes[0], panels):
    for impl in ("plain", "folded", "compiled", "triton"):
        pts = sorted(
            (int(g.rsplit("-M", 1)[1]), by[impl]["stats"]["median"] * 1e3)
            for g, by in rows.items() if g.startswith(panel + "-M") and impl in by
        )
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=impl)
    ax.set_title(panel.removeprefix("cuda-"))
    ax.set_xlabel("blocks M (C = 384)")
    ax.set_ylabel("median ms")
    ax.grid(True, which="both", alpha=0.3)
axes[0][0].legend()
fig.suptitle(f"CAPool on {gpu}")
fig.tight_layout()
fig.savefig(dst.replace(".md", ".png"), dpi=120)
PYEOF
record capool-table "$(outcome $?)"

# --- whole model on CUDA: training step vs plain, torch.compile, a second GPU -------------------
if "$PY" -c 'import nystrom_attention' 2>/dev/null; then
  for check in train-step compile second-gpu; do
    name="${check//-/_}"
    TRITON_INTERPRET=0 "$PY" benchmarks/gpu_model_check.py "$check" "$OUT/$name.json" \
      >"$OUT/$name.txt" 2>&1
    rc=$?
    if [ "$rc" -eq 3 ]; then record "$check" skipped; else record "$check" "$(outcome "$rc")"; fi
  done

  # --- dsca train on CUDA: bf16 and fp16 autocast, --resume after kill -9, cuda:1 ----------------
  work="$OUT/train_work"
  rm -rf "$work"
  if TRITON_INTERPRET=0 "$PY" -m dsca.cli.dsca_main -q demo --out "$work/demo" --patients 60 \
      --epochs 2 --folds 0 --no-control --device cuda >"$OUT/train_bf16.txt" 2>&1; then
    record train-amp-auto pass
  else
    record train-amp-auto FAIL
  fi
  cfg="$work/demo/signal.yaml"
  variant() {  # variant NAME KEY=VALUE...: a copy of the demo's config with keys replaced
    "$PY" - "$cfg" "$work/$1.yaml" "${@:2}" <<'PYEOF'
import sys

import yaml

src, dst, *pairs = sys.argv[1:]
cfg = yaml.safe_load(open(src))
for pair in pairs:
    key, value = pair.split("=", 1)
    cfg[key] = yaml.safe_load(value)
yaml.safe_dump(cfg, open(dst, "w"))
PYEOF
  }
  if [ -f "$cfg" ]; then
    variant fp16 amp=fp16 epochs=2 folds=[0]
    if TRITON_INTERPRET=0 "$PY" -m dsca.cli.dsca_main -q train --config "$work/fp16.yaml" \
        --out "$work/fp16" --device cuda >"$OUT/train_fp16.txt" 2>&1; then
      record train-amp-fp16 pass; else record train-amp-fp16 FAIL; fi

    variant resume epochs=6 es_patience=null folds=[0]
    TRITON_INTERPRET=0 "$PY" -m dsca.cli.dsca_main -q train --config "$work/resume.yaml" \
      --out "$work/resume" --device cuda >"$OUT/train_resume.txt" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do  # kill -9 once the first epoch's last.pt exists
      [ -f "$work/resume/fold0/last.pt" ] && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    if TRITON_INTERPRET=0 "$PY" -m dsca.cli.dsca_main -q train --config "$work/resume.yaml" \
        --out "$work/resume" --device cuda --resume >>"$OUT/train_resume.txt" 2>&1 \
        && [ -f "$work/resume/metrics.json" ] \
        && grep -q "resumed after epoch" "$work/resume/train.log"; then
      record train-resume-after-kill pass; else record train-resume-after-kill FAIL; fi

    if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
      if TRITON_INTERPRET=0 "$PY" -m dsca.cli.dsca_main -q train --config "$work/fp16.yaml" \
          --out "$work/cuda1" --device cuda:1 >"$OUT/train_cuda1.txt" 2>&1; then
        record train-cuda1 pass; else record train-cuda1 FAIL; fi
    else
      record train-cuda1 skipped
      echo "gpu_check: one GPU: --device cuda:1 skipped" >"$OUT/train_cuda1.txt"
    fi

    # torchrun with nccl: process group, flat gradient all-reduce and gathers on CUDA ranks (one
    # rank per GPU, at most 2); then predict over the same ranks (`--`: torchrun would read
    # --run as its own --run-path)
    ranks="$("$PY" -c 'import torch; print(min(2, torch.cuda.device_count()))')"
    store="$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["store"])' "$cfg")"
    if TRITON_INTERPRET=0 "$PY" -m torch.distributed.run --standalone --nproc-per-node="$ranks" \
        -m dsca.cli.dsca_main -q train --config "$work/fp16.yaml" --out "$work/nccl" --device cuda \
        >"$OUT/train_nccl.txt" 2>&1 && [ -f "$work/nccl/metrics.json" ]; then
      record train-torchrun-nccl pass; else record train-torchrun-nccl FAIL; fi
    if TRITON_INTERPRET=0 "$PY" -m torch.distributed.run --standalone --nproc-per-node="$ranks" \
        -m -- dsca.cli.dsca_main -q predict --run "$work/nccl" --store "$store" --device cuda \
        --out "$work/nccl_predict" >"$OUT/predict_nccl.txt" 2>&1; then
      record predict-torchrun-nccl pass; else record predict-torchrun-nccl FAIL; fi
  else
    record train-amp-fp16 FAIL
    record train-resume-after-kill FAIL
    record train-cuda1 FAIL
    record train-torchrun-nccl FAIL
    record predict-torchrun-nccl FAIL
  fi
else
  for check in train-step compile second-gpu train-amp-auto train-amp-fp16 \
      train-resume-after-kill train-cuda1 train-torchrun-nccl predict-torchrun-nccl; do
    record "$check" skipped
  done
  echo "gpu_check: nystrom_attention is not installed: whole-model checks skipped (carry its wheel)"
fi

# --- whole-model profile per CAPool backend (needs the model's dependency nystrom-attention) ----
if "$PY" -c 'import nystrom_attention' 2>/dev/null; then
  for backend in torch triton; do
    TRITON_INTERPRET=0 "$PY" -m dsca.cli.dsca_main profile --n-patches 4096 --device cuda \
      --backend "$backend" --json "$OUT/profile_$backend.json" 2>&1 | tee "$OUT/profile_$backend.txt"
    record "profile-$backend" "$(outcome "${PIPESTATUS[0]}")"
  done
else
  record profile-torch skipped
  record profile-triton skipped
  echo "gpu_check: nystrom_attention is not installed: dsca profile skipped (carry its wheel)"
fi

# --- summary: every check and goal, pass or fail --------------------------------------------------
"$PY" - "$OUT" "$checks" <<'PYEOF'
import json
import pathlib
import sys

out, checks = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = [line.split(" ", 1)[::-1] for line in checks.splitlines() if line.strip()]
goals = []
step = out / "train_step.json"
if step.is_file():
    goals += json.loads(step.read_text()).get("goals", [])
table = out / "capool_table.md"
lines = ["# gpu_check summary", "", "| check | result |", "|---|---|"]
lines += [f"| {name} | {result} |" for result, name in rows]
lines += ["", "## Goals", ""]
lines += [f"- {g['goal']}: {g['value']:.2f} ({'met' if g['met'] else 'NOT met'})" for g in goals]
if table.is_file():
    lines += [line for line in table.read_text().splitlines() if line.startswith("- ")]
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps({"checks": dict((n, r) for r, n in rows),
                                              "goals": goals}, indent=1))
print("\n".join(lines))
PYEOF

echo "gpu_check: results in $OUT (exit $status)"
exit $status
