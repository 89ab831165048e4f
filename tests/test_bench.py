"""The GPU-ready bench commands, run on the CPU with a tiny data set: they finish and write their tables."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, models_of

pytest.importorskip("torch")


def _run(args, tmp_path, **env):
    environment = {k: v for k, v in os.environ.items()} | env
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


def test_torch_bench_runs_five_fold_style_and_survives_a_forced_oom(tiny_data, tmp_path):
    out = tmp_path / "gpu_out"
    printed = _run(["bench/bench_torch.py", "--data-dir", str(tiny_data), "--only", "new", "--epochs", "1",
                    "--force-oom", "--out", str(out)], tmp_path, CMI_N_FOLDS="2")
    table = (out / "bench_torch.md").read_text()
    assert table.strip() in printed
    assert "| new (pad 90, 3 pools, batch 512) | 90 |" in table
    oom_row = [line for line in table.splitlines() if line.startswith("| forced OOM")][0]
    assert "injected OOM above micro-batch 128 (no GPU)" in oom_row      # no CUDA here: the CPU stand-in
    assert "fold 0 finished at micro-batch 128 x 4 accumulation steps" in oom_row and "| survived |" in oom_row


def test_end_to_end_bench_runs_on_any_data_folder_and_writes_its_tables(tiny_data, tmp_path):
    out = tmp_path / "gpu_out"
    printed = _run(["bench/bench_end_to_end.py", "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "run"),
                    "--out", str(out), "--folds", "2"], tmp_path, RUN_TORCH_TRAINING="0", RUN_KERAS_TRAINING="0",
                   LGBM_N_ESTIMATORS="20", LGBM_ES_ROUNDS="5")
    table = (out / "bench_end_to_end.md").read_text()
    assert table in printed and "| lgbm imu |" in table and "| **total (run)** |" in table
    assert "route full: ensemble" in table and "p50" in table


def test_score_bench_runs_a_row_and_writes_its_ablation_table(tiny_data, tmp_path):
    out = tmp_path / "score"
    printed = _run(["bench/bench_score.py", "--data-dir", str(tiny_data), "--rows", "honest", "--seeds", "1",
                    "--epochs", "1", "--families", "torch", "--out", str(out)], tmp_path, CMI_N_FOLDS="2")
    table = (out / "bench_score.md").read_text()
    assert table.strip() in printed
    row = [line for line in table.splitlines() if line.startswith("| honest selection")][0]
    assert row.count("|") == 20 and " 1 |" in row                     # one seed; every column filled or "-"
    result = __import__("json").loads((out / "jobs" / "honest_seed1" / "score.json").read_text())
    assert set(result["holdout"]) >= {"torch", "blend", "predict"} and "torch/imu" in result["oof"]
    assert _run(["bench/bench_score.py", "--report", "--out", str(out)], tmp_path).strip() == table.strip()


def test_predict_bench_times_every_implementation_on_the_same_models(all_families_run, tiny_data, tmp_path):
    saved = json.loads((all_families_run[0] / "artifacts.json").read_text())["families"]
    models = models_of(all_families_run[0], tmp_path / "lgbm_torch",        # Torch is where they differ
                       {"lgbm": saved["lgbm"], "torch": saved["torch"]})
    printed = _run(["bench/bench_predict.py", "--model-dir", str(models), "--data-dir", str(tiny_data), "--calls", "12",
                    "--baseline-script", str(ROOT / "train_infer.py")], tmp_path)
    rows = [line for line in printed.splitlines() if line.startswith("| lgbm_torch |")]
    assert [row.split(" | ")[1] for row in rows] == ["torch.func stack (this script)",
                                                     "plain loop over the nets (this script)", "train_infer.py"]
    assert all(row.endswith("| 100% |") for row in rows)     # the same answers, whichever implementation
