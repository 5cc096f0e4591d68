"""`dsca profile`: the table covers every module, FLOPs add up and agree across backends."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("nystrom_attention")  # the model's dependency (absent on bare GPU images)

from dsca import build_model  # noqa: E402
from dsca.cli.dsca_main import main  # noqa: E402
from dsca.costs import count_macs  # noqa: E402
from dsca.profile import _loss, format_table, profile_model, synthetic_bag  # noqa: E402
from kernels_cases import default_device  # noqa: E402

CFG = {"dims": "48-16-16-4", "tra_nhead": 2}


def test_profile_flops_match_flop_counter_and_rows_add_up() -> None:
    report = profile_model({**CFG, "capool_backend": "torch"}, n_patches=9, repeats=1)
    model = build_model({**CFG, "capool_backend": "torch"})
    names = [n for n, _ in model.named_children()]
    assert [m.name for m in report.modules][: len(names)] == names
    # torch's counter, taught the in-place GEMMs that the block conv and the encoder's
    # attention backward run (it skips them: the x20 stream would look 10x cheaper)
    aten = torch.ops.aten
    inplace = {
        aten.addmm_: lambda _, a, b, *args, **kw: 2 * a[0] * a[1] * b[1],  # [m,k] @ [k,n]
        aten.baddbmm_: lambda _, a, b, *args, **kw: 2 * a[0] * a[1] * a[2] * b[2],
    }
    with FlopCounterMode(display=False, custom_mapping=inplace) as counter:
        _loss(model(*synthetic_bag(9, 48, "cpu"))).backward()
    assert report.total.flops == counter.get_total_flops() > 0
    assert sum(m.flops for m in report.modules) == report.total.flops
    assert report.total.params == sum(p.numel() for p in model.parameters())
    # the x20 stream is where the work is: it must get FLOPs and time attributed to it
    x20 = next(m for m in report.modules if m.name.startswith("patchx20"))
    assert x20.flops > 0 and x20.fwd_ms > 0 and x20.bwd_ms > 0 and x20.saved_mib > 0
    # the analytic forward MACs of dsca.costs.count_macs, split over the same modules
    total_macs = count_macs({**CFG, "capool_backend": "torch"}, 9)["total"]
    assert sum(m.fwd_macs for m in report.modules) == report.total.fwd_macs == total_macs
    assert x20.fwd_macs > 0 and all(m.fwd_macs > 0 for m in report.modules if m.params)
    # forward + weight gradients of the x20 GEMMs: at least 2 x 2 FLOPs per forward MAC
    assert x20.flops >= 4 * x20.fwd_macs
    table = format_table(report)
    assert all(n in table for n in names) and "total" in table and "fwd MAC" in table


def test_profile_triton_backend_counts_the_same_flops() -> None:
    """The Triton ops' FLOP formulas count what the PyTorch path's einsums count."""
    dev = default_device()  # CPU under the interpreter, CUDA in benchmarks/gpu_check.sh
    torch_report = profile_model({**CFG, "capool_backend": "torch"}, 5, device=dev, repeats=1)
    triton_report = profile_model({**CFG, "capool_backend": "triton"}, 5, device=dev, repeats=1)
    assert triton_report.total.flops == torch_report.total.flops
    # (saved-for-backward sizes are not compared here: on CPU the model fuses LayerNorm + ReLU
    # into the torch CAPool path and recomputes them, which the Triton path does not)


def test_profile_cli_prints_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "profile.json"
    rc = main(["profile", "--n-patches", "6", "--dims", "48-16-16-4", "--backend", "torch",
               "--device", "cpu", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "patchx20_embedding_layer" in text and "FLOP/s" in text
    data = json.loads(out.read_text())
    assert data["n_patches"] == 6 and data["total"]["flops"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n-patches", "0"], "--n-patches must be >= 1"),
        (["--dims", "48-16"], "'dims'"),
        (["--config", "/nonexistent.yaml"], "config file not found"),
    ],
)
def test_profile_cli_bad_input_is_one_line_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["profile", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsca profile: error:") and message in err[0]


def test_profile_cli_reads_model_keys_of_reference_config(
    reference_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """The study's config_hier.yaml (with its data-path keys) is accepted; --dims overrides."""
    config = reference_dir / "config_hier.yaml"
    rc = main(["profile", "--config", str(config), "--dims", "48-16-16-4", "--n-patches", "4",
               "--device", "cpu", "--repeats", "1"])
    assert rc == 0
    assert "dims=48-16-16-4" in capsys.readouterr().out
