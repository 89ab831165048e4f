"""What a run leaves behind: on Kaggle the output holds artifacts, logs and the submission only (scratch data
lives elsewhere), and the pictures a competitor looks at."""
import json

import polars as pl

import train_infer as ti
from conftest import script_env

# What a training run may leave in its output folder; anything else (the frame store, synthetic data) is scratch.
OUTPUTS = {"artifacts.json", "models", "train_log.txt", "run_summary.json", "summary.csv", "fold_metrics.csv",
           "epoch_log.csv", "oof_predictions.parquet", "confusion_matrix.csv", "confusion_matrix.png",
           "training_curves.png", "submission.csv"}


def test_a_kaggle_run_keeps_scratch_data_out_of_its_output(tmp_path, monkeypatch):
    working, temp = tmp_path / "kaggle" / "working", tmp_path / "kaggle" / "temp"
    working.mkdir(parents=True)
    monkeypatch.setattr(ti, "KAGGLE_OUTPUT_DIR", str(working))      # "on Kaggle", in a test folder
    monkeypatch.setattr(ti, "KAGGLE_SCRATCH_DIR", str(temp))
    monkeypatch.setitem(ti.SYNTHETIC_SIZES, "demo", (4, 2))         # a small synthetic set, as Kaggle would make
    with script_env(DL_EPOCHS="1", DL_BATCH_SIZE="64", RUN_KERAS_TRAINING="0", LGBM_N_ESTIMATORS="20",
                    LGBM_ES_ROUNDS="5", ENSEMBLE_TRIALS="16"):
        assert ti.Config().OUTPUT_PATH == str(working) and ti.Config().scratch_dir == temp
        result = ti.main(["--synthetic", "--folds", "2"])
    assert {p.name for p in working.iterdir()} <= OUTPUTS, sorted(p.name for p in working.iterdir())
    assert (temp / "frame_features" / ti.FRAME_STORE_MANIFEST).is_file() and (temp / "synthetic_demo").is_dir()
    assert (working / "submission.csv").is_file() and (working / "models").is_dir()
    assert 0 < result["output_mb"] <= ti.folder_megabytes(working) < result["output_mb"] + 0.5   # before its summary
    assert "Output folder" in (working / "train_log.txt").read_text()
    assert json.loads((working / "run_summary.json").read_text())["output_mb"] == result["output_mb"]


def test_the_scratch_folder_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("CMI_SCRATCH_DIR", str(tmp_path / "scratch"))
    cfg = ti.Config()
    assert cfg.frame_feature_dir == tmp_path / "scratch" / "frame_features"
    monkeypatch.delenv("CMI_SCRATCH_DIR")
    assert ti.Config().scratch_dir == ti.Path(ti.Config().OUTPUT_PATH)          # off Kaggle: the output folder


def test_a_run_draws_its_confusion_matrix_and_training_curves(all_families_run):
    out, _ = all_families_run
    for picture in ("confusion_matrix.png", "training_curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    log = pl.read_csv(out / "epoch_log.csv")
    assert log.filter(pl.col("fold") >= 0)["score"].is_not_null().all()          # what the curves are drawn from


def test_the_curves_skip_refits_and_need_scores(tmp_path):
    rows = [{"family": "torch", "variant": "imu", "fold": -1, "seed": 0, "epoch": 1, "score": None}]
    ti.save_training_curves(tmp_path, rows)                       # a refit alone has nothing to draw
    assert not (tmp_path / "training_curves.png").exists()
    rows += [{"family": "torch", "variant": "imu", "fold": k, "seed": 0, "epoch": e, "score": 0.1 * e + k / 100}
             for k in range(2) for e in range(1, 4)]
    ti.save_training_curves(tmp_path, rows)
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
