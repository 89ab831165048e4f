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
    assert s.dl.BATCH_SIZE is None and s.dl.ACCUM_STEPS == 1            # by device: DEVICE_DEFAULTS
    assert s.dl.ES_PATIENCE == 6 and s.dl.ES_MIN_DELTA == 1e-4
    assert s.frame_cache.MAX_ITEMS is None and s.frame_cache.MAX_BYTES == 2048 * 1024 * 1024   # items: from the data
    assert s.keras.BATCH_SIZE is None and s.keras.EARLY_STOPPING_PATIENCE == 3
    assert s.recipe.SELECTION == "fixed" and s.recipe.LABEL_SMOOTHING == 0.1 and s.recipe.MIXUP == 0.4
    assert s.keras_speed.MIXED_PRECISION is None and s.keras_speed.JIT_COMPILE is False
    assert s.ensemble.TRIALS == 1024
    assert s.cfg.RUN_LGBM_TRAINING and s.cfg.RUN_TORCH_TRAINING and s.cfg.RUN_KERAS_TRAINING
    for deep in (s.dl, s.keras):                                  # by device: DEVICE_DEFAULTS
        assert deep.EPOCHS is None and deep.CONV_WIDTH is None and deep.HIDDEN is None
    assert s.cfg.N_FOLDS == 5 and s.cfg.SYNTHETIC_SIZE == "demo"
    assert s.cfg.frame_feature_dir == Path(s.cfg.OUTPUT_PATH) / "frame_features"         # not on Kaggle


def test_deep_sizes_follow_the_device_unless_set(monkeypatch):
    gpu = ti.resolve_device_defaults(ti.DLConfig(), gpu=True, prefix="DL")
    assert (gpu.EPOCHS, gpu.BATCH_SIZE, gpu.CONV_WIDTH, gpu.HIDDEN) == (40, 512, 128, 128)   # the notes' network
    assert ti.conv_plan(gpu.CONV_WIDTH, 4) == [(128, 7), (256, 5), (256, 3), (256, 3)]      # notes 2-1
    cpu = ti.resolve_device_defaults(ti.KerasConfig(), gpu=False, prefix="KERAS")
    assert (cpu.EPOCHS, cpu.BATCH_SIZE, cpu.CONV_WIDTH, cpu.HIDDEN) == (20, 64, 32, 64)
    monkeypatch.setenv("KERAS_EPOCHS", "12")
    monkeypatch.setenv("KERAS_CONV_WIDTH", "96")
    chosen = ti.resolve_device_defaults(ti.KerasConfig(), gpu=True, prefix="KERAS")
    assert (chosen.EPOCHS, chosen.BATCH_SIZE, chosen.CONV_WIDTH, chosen.HIDDEN) == (12, 512, 96, 128)


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
