#!/usr/bin/env bash
# CAPool on a CUDA machine: kernel tests without the interpreter, then the GPU benchmarks, then
# a markdown table of the results. Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh            # OUT defaults to ./gpu_check_out
#
# Assumes a python3 that already has a CUDA build of torch, triton, pytest and pytest-benchmark
# (as on the project's GPU image, which has no network): dsca itself is installed with
# --no-deps. DTYPES=bf16 (default) or "bf16 fp32" picks the benchmarked dtypes.
# Writes under $OUT: env.txt, kernel_tests.txt/.xml, capool_bench.json, capool_bench.txt,
# capool_table.md (also printed), capool_table.png, profile_{torch,triton}.txt/.json.
set -uo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
DTYPES="${DTYPES:-bf16}"
mkdir -p "$OUT"
status=0

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
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# --- benchmarks ---------------------------------------------------------------------------------
sel="cuda and ($(echo "$DTYPES" | sed 's/ / or /g'))"
TRITON_INTERPRET=0 "$PY" -m pytest benchmarks/test_bench_capool.py --benchmark-only \
  -p no:cacheprovider -k "$sel" --benchmark-max-time=0.5 --benchmark-warmup=on \
  --benchmark-json="$OUT/capool_bench.json" 2>&1 | tee "$OUT/capool_bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

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
        lines.append(f"| {group} | {impl} | {t * 1e3:.3f} | {sp:.2f}x | {sc:.2f}x | {peak:.1f} | {pr:.2f} |")
        if group == "cuda-bfloat16-fwdbwd-M4096" and impl == "triton":
            goals = [
                f"- fwd+bwd, M=4096, bf16: Triton vs plain {sp:.2f}x (goal >= 5x: {'met' if sp >= 5 else 'NOT met'})",
                f"- Triton vs torch.compile(folded) {sc:.2f}x (goal >= 1.3x: {'met' if sc >= 1.3 else 'NOT met'})",
                f"- peak memory vs plain {pr:.2f} (goal <= 0.5: {'met' if pr <= 0.5 else 'NOT met'})",
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
[ $? -eq 0 ] || status=1

# --- whole-model profile per CAPool backend (needs the model's dependency nystrom-attention) ----
if "$PY" -c 'import nystrom_attention' 2>/dev/null; then
  for backend in torch triton; do
    TRITON_INTERPRET=0 "$PY" -m dsca.cli.dsca_main profile --n-patches 4096 --device cuda \
      --backend "$backend" --json "$OUT/profile_$backend.json" 2>&1 | tee "$OUT/profile_$backend.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
else
  echo "gpu_check: nystrom_attention is not installed: dsca profile skipped (carry its wheel)"
fi

echo "gpu_check: results in $OUT (exit $status)"
exit $status
