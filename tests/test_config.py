"""Config classes read the environment when built; a malformed value names its variable."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_infer as ti


def test_defaults_follow_the_design_notes():
    s = ti.Settings.from_env()
    assert s.dl.FIXED_PAD_LEN == 90 and s.dl.PAD_LEN_PERCENTILE == 95
    assert s.dl.BATCH_SIZE is None and s.dl.ACCUM_STEPS == 1            # by device: GPU_BATCH, or CPU_BATCH
    assert s.dl.ES_PATIENCE == 6 and s.dl.ES_MIN_DELTA == 1e-4
    assert s.frame_cache.MAX_ITEMS is None and s.frame_cache.MAX_BYTES == 2048 * 1024 * 1024   # items: from the data
    assert s.keras.BATCH_SIZE is None and s.keras.EARLY_STOPPING_PATIENCE == 3
    assert s.recipe.SELECTION == "fixed" and s.recipe.LABEL_SMOOTHING == 0.1 and s.recipe.MIXUP == 0.4
    assert s.keras_speed.MIXED_PRECISION is None and s.keras_speed.JIT_COMPILE is False
    assert s.ensemble.TRIALS == 1024
    assert s.cfg.RUN_LGBM_TRAINING and s.cfg.RUN_TORCH_TRAINING and s.cfg.RUN_KERAS_TRAINING
    assert s.dl.EPOCHS is None and s.keras.EPOCHS is None          # by device: GPU_EPOCHS, or CPU_EPOCHS
    assert s.cfg.N_FOLDS == 5 and s.cfg.SYNTHETIC_SIZE == "demo"
    assert s.dl.FRAME_FEATURE_DIR == Path(s.cfg.OUTPUT_PATH) / "frame_features"


def test_epochs_follow_the_device_unless_set(warnings_seen):
    assert ti.resolve_epochs(None, gpu=True, variable="DL_EPOCHS") == ti.GPU_EPOCHS == 40
    assert ti.resolve_epochs(None, gpu=False, variable="DL_EPOCHS") == ti.CPU_EPOCHS
    assert "DL_EPOCHS is unset and there is no GPU" in warnings_seen.text
    assert ti.resolve_epochs(12, gpu=False, variable="KERAS_EPOCHS") == 12


def test_batch_follows_the_device_unless_set():
    assert ti.resolve_batch(None, gpu=True, variable="DL_BATCH_SIZE") == ti.GPU_BATCH == 512
    assert ti.resolve_batch(None, gpu=False, variable="DL_BATCH_SIZE") == ti.CPU_BATCH == 64
    assert ti.resolve_batch(128, gpu=True, variable="KERAS_BATCH_SIZE") == 128


def test_environment_is_read_when_the_object_is_built(monkeypatch):
    monkeypatch.setenv("DL_BATCH_SIZE", "256")
    monkeypatch.setenv("FRAME_CACHE_MAX_MB", "1.5")
    monkeypatch.setenv("KERAS_MP", "0")
    monkeypatch.setenv("AUG_MIXUP", "0")
    assert ti.DLConfig().BATCH_SIZE == 256 and ti.RecipeConfig().MIXUP == 0.0
    assert ti.FrameCacheConfig().MAX_BYTES == int(1.5 * 1024 * 1024)
    assert ti.KerasSpeedConfig().MIXED_PRECISION is False


@pytest.mark.parametrize("name,value", [
    ("DL_BATCH_SIZE", "abc"), ("DL_BATCH_SIZE", "-1"), ("FRAME_CACHE_MAX_MB", "lots"),
    ("FRAME_CACHE_MAX_MB", "nan"), ("KERAS_MP", "maybe"), ("CMI_N_FOLDS", "1"), ("CMI_SYNTHETIC_SIZE", "huge"),
    ("KERAS_CONV_BLOCKS", "5"), ("LGBM_LEARNING_RATE", "fast"), ("RUN_LGBM_TRAINING", "2"),
    ("RUN_KERAS_TRAINING", "maybe"), ("DL_POOLS", "0"), ("DL_DROPOUT", "-0.1"), ("DL_EPOCHS", "0"),
    ("KERAS_EPOCHS", "ten"), ("DEEP_SELECTION", "best"), ("AUG_PROBABILITY", "1.5"), ("AUG_MIXUP", "-0.4"),
    ("AUG_LABEL_SMOOTHING", "0.9"), ("AUG_STRETCH", "x"),
])
def test_bad_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ti.ConfigError, match=name):
        ti.Settings.from_env()


def test_main_stops_at_start_up_on_a_bad_value(monkeypatch, tmp_path):
    monkeypatch.setenv("DL_BATCH_SIZE", "abc")
    with pytest.raises(SystemExit, match="DL_BATCH_SIZE"):
        ti.main(["--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()                 # nothing was done before the check


def test_import_has_no_side_effects(tmp_path):
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = str(Path(ti.__file__).parent)
    proc = subprocess.run([sys.executable, "-c", "import train_infer"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert list(tmp_path.iterdir()) == []
    heavy = subprocess.run([sys.executable, "-c", "import sys, train_infer; "
                            "print(sorted(m for m in ('lightgbm', 'torch', 'tensorflow', 'keras', 'sklearn') "
                            "if m in sys.modules))"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert heavy.stdout.strip() == "[]"
