"""Shared fixtures: a tiny synthetic competition set and one small training run, built once per session."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_infer as ti  # noqa: E402

REAL_DIR = ROOT.parent / "shared" / "cmi_real"
# Variables the script reads: tests start from a clean slate so a developer's shell cannot change them.
SCRIPT_ENV_PREFIXES = ("CMI_", "LGBM_", "DL_", "TORCH_", "KERAS_", "FRAME_CACHE_", "ENSEMBLE_", "RUN_", "AUG_", "AUX_",
                       "DEEP_SELECTION", "FULL_FIT", "TURNED_DEVICES", "KAGGLE_IS_COMPETITION_RERUN")


@contextmanager
def script_env(**values: str):
    saved = {k: v for k, v in os.environ.items() if k.startswith(SCRIPT_ENV_PREFIXES)}
    for k in saved:
        del os.environ[k]
    os.environ.update(values)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith(SCRIPT_ENV_PREFIXES)]:
            del os.environ[k]
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(SCRIPT_ENV_PREFIXES):
            monkeypatch.delenv(k)
    yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 train subjects (~400 sequences) and 2 test subjects (~200, half IMU-only), competition format."""
    return ti.generate_synthetic_competition_data(tmp_path_factory.mktemp("tiny_data"), 4, 2, seed=7)


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """One end-to-end run on the tiny set: 2 folds, train, save, answer every test sequence; the joint per-subject
    assignment forced on, so that its path (the orientation classifier saved, loaded and read) is always covered."""
    out = tmp_path_factory.mktemp("trained")
    with script_env(LGBM_N_ESTIMATORS="60", LGBM_ES_ROUNDS="15", RUN_TORCH_TRAINING="0", RUN_KERAS_TRAINING="0",
                    ENSEMBLE_ASSIGNMENT="joint", ENSEMBLE_PER_SUBJECT="1"):
        result = ti.main(["--data-dir", str(tiny_data), "--output-dir", str(out), "--folds", "2"])
    return out, result


@pytest.fixture(scope="session")
def all_families_run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """The default run (every family on), 2-3 epochs, two folds, small batches: the shape of the real thing, with
    the orientation head on too (off by default), so that the tests cover both auxiliary heads' path."""
    out = tmp_path_factory.mktemp("all_families")
    with script_env(DL_EPOCHS="3", KERAS_EPOCHS="2", DL_BATCH_SIZE="32", KERAS_BATCH_SIZE="64", AUX_ORIENTATION_WEIGHT="0.5",
                    LGBM_N_ESTIMATORS="20", LGBM_ES_ROUNDS="5", ENSEMBLE_TRIALS="64"):
        result = ti.main(["--data-dir", str(tiny_data), "--output-dir", str(out), "--folds", "2"])
    return out, result


@pytest.fixture
def predictor(trained_run):
    ti.configure_inference(trained_run[0])
    yield ti._get_predictor()
    ti.configure_inference(None)


def other_features_record(scope: str) -> dict:
    """The manifest fields that feature code computing other numbers (another gravity) would save."""
    saved = ti.GRAVITY
    ti.GRAVITY = 9.5
    ti.feature_probe.cache_clear()
    try:
        return ti.feature_record(True, scope)
    finally:
        ti.GRAVITY = saved
        ti.feature_probe.cache_clear()


def models_of(source: Path, target: Path, families: dict) -> Path:
    """A model folder serving ``source``'s saved models with its manifest's families replaced by ``families``
    ({family: {variant: spec}}): the model files are linked, not copied."""
    import json
    manifest = json.loads((source / ti.ARTIFACT_MANIFEST).read_text())
    manifest["families"] = families
    target.mkdir(parents=True, exist_ok=True)
    (target / ti.ARTIFACT_MANIFEST).write_text(json.dumps(manifest))
    (target / "models").symlink_to(source / "models")
    return target


def copy_artifacts(source: Path, target: Path) -> Path:
    """A private copy of a training run's artifacts (manifest and models) to break."""
    import shutil
    shutil.copytree(source / "models", target / "models")
    shutil.copy(source / "artifacts.json", target / "artifacts.json")
    return target


@pytest.fixture
def warnings_seen(caplog):
    """The script's logger does not propagate; attach caplog's handler to it directly."""
    ti.LOG.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="cmi")
    yield caplog
    ti.LOG.removeHandler(caplog.handler)
