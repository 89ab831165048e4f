"""Synthetic data in the exact competition format; loading errors that name the problem."""
import shutil

import numpy as np
import polars as pl
import pytest

import train_infer as ti
from conftest import REAL_DIR


def test_synthetic_train_matches_the_real_format(tiny_data):
    train = pl.read_csv(tiny_data / "train.csv")
    assert train.columns == ti.TRAIN_COLUMNS
    if (REAL_DIR / "train_sample.csv").exists():
        real = pl.read_csv(REAL_DIR / "train_sample.csv")
        assert train.columns == real.columns
        assert train.dtypes == real.dtypes                  # inferred from the CSV text, as a user's reader would
    assert train["row_id"].str.contains(r"^SEQ_\d{6}_\d{6}$").all()
    assert train["sequence_id"].str.contains(r"^SEQ_\d{6}$").all()
    assert train["subject"].str.contains(r"^SUBJ_\d{6}$").all()
    assert set(train["gesture"].unique()) == set(ti.GESTURES)
    assert set(train["orientation"].unique()) == set(ti.ORIENTATIONS)
    assert (train["row_id"] == train["sequence_id"] + "_" + train["sequence_counter"].cast(pl.String).str.zfill(6)).all()


def test_synthetic_sequences_look_like_the_real_ones(tiny_data):
    train = pl.read_csv(tiny_data / "train.csv")
    per_seq = train.group_by("sequence_id", maintain_order=True).agg(
        pl.len(), (pl.col("phase") == "Gesture").sum().alias("n_gesture"),
        (pl.col("phase") == "Gesture").arg_max().alias("first_gesture"),
        pl.col("sequence_type").first(), pl.col("gesture").first())
    assert per_seq["len"].min() >= 29 and 45 <= per_seq["len"].median() <= 75
    # Transition first, then the gesture frames at the end
    assert (per_seq["first_gesture"] + per_seq["n_gesture"] == per_seq["len"]).all()
    assert per_seq["n_gesture"].median() == pytest.approx(31, abs=4)
    targets = per_seq.filter(pl.col("gesture").is_in(ti.TARGET_GESTURES))
    assert (targets["sequence_type"] == "Target").all()
    tof = train.select(pl.col("^tof_.*$")).to_numpy()
    share_no_reflection = np.mean(tof[np.isfinite(tof)] == -1)
    assert 0.35 < share_no_reflection < 0.7               # DATA.md: about half
    magnitude = np.linalg.norm(train.select("acc_x", "acc_y", "acc_z").to_numpy(), axis=1)
    assert 9.0 < np.median(magnitude) < 10.8               # gravity included


def test_synthetic_test_is_half_imu_only_and_unlabelled(tiny_data):
    test = pl.read_csv(tiny_data / "test.csv")
    assert test.columns == ti.TEST_COLUMNS
    if (REAL_DIR / "test.csv").exists():
        assert test.columns == pl.read_csv(REAL_DIR / "test.csv").columns
    thm_tof_null = test.group_by("sequence_id").agg(
        pl.all_horizontal([pl.col(c).is_null().all() for c in ti.THM_COLUMNS + ["tof_1_v0", "tof_5_v63"]]).alias("imu"))
    share = thm_tof_null["imu"].mean()
    assert 0.35 < share < 0.65
    demographics = pl.read_csv(tiny_data / "test_demographics.csv")
    assert demographics.columns == ti.DEMOGRAPHIC_COLUMNS
    assert set(test["subject"].unique()) <= set(demographics["subject"])


def test_synthetic_generation_is_deterministic(tmp_path):
    a = ti.generate_synthetic_competition_data(tmp_path / "a", 2, 1, seed=3)
    b = ti.generate_synthetic_competition_data(tmp_path / "b", 2, 1, seed=3)
    for name in ti.DATA_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_synthetic_cache_is_reused_and_rebuilt_on_change(tmp_path):
    folder = ti.generate_synthetic_competition_data(tmp_path, 2, 1, seed=3)
    stamp = (folder / "train.csv").stat().st_mtime_ns
    ti.generate_synthetic_competition_data(tmp_path, 2, 1, seed=3)
    assert (folder / "train.csv").stat().st_mtime_ns == stamp
    ti.generate_synthetic_competition_data(tmp_path, 2, 1, seed=4)   # another seed: regenerated
    assert (folder / "train.csv").stat().st_mtime_ns != stamp


def _copy_data(src, dst, edit_train=None):
    shutil.copytree(src, dst)
    if edit_train is not None:
        train = pl.read_csv(dst / "train.csv")
        edit_train(train).write_csv(dst / "train.csv")
    return dst


def test_load_train_joins_demographics_and_sorts(tiny_data):
    train = ti.load_train_data(tiny_data)
    assert {"handedness", "age"} <= set(train.columns)
    assert train["acc_x"].dtype == pl.Float32
    assert train.select(pl.col("sequence_counter").diff().over("sequence_id").fill_null(1).min()).item() == 1


def test_misspelled_column_is_named(tiny_data, tmp_path):
    folder = _copy_data(tiny_data, tmp_path / "d", lambda t: t.rename({"acc_x": "acc_xx", "thm_3": "thm3"}))
    with pytest.raises(ti.ConfigError, match=r"2 missing column\(s\): acc_x \(found 'acc_xx'\?\), thm_3"):
        ti.load_train_data(folder)


def test_missing_column_is_named(tiny_data, tmp_path):
    folder = _copy_data(tiny_data, tmp_path / "d", lambda t: t.drop("tof_5_v63"))
    with pytest.raises(ti.ConfigError, match="tof_5_v63"):
        ti.load_train_data(folder)


def test_label_outside_the_18_gestures(tiny_data, tmp_path):
    folder = _copy_data(tiny_data, tmp_path / "d", lambda t: t.with_columns(
        pl.when(pl.col("sequence_counter") == 0).then(pl.lit("Juggling")).otherwise(pl.col("gesture")).alias("gesture")))
    with pytest.raises(ti.ConfigError, match="Juggling"):
        ti.load_train_data(folder)


def test_subject_without_demographics(tiny_data, tmp_path):
    folder = _copy_data(tiny_data, tmp_path / "d")
    demo = pl.read_csv(folder / "train_demographics.csv")
    demo.slice(1).write_csv(folder / "train_demographics.csv")
    with pytest.raises(ti.ConfigError, match="no row in train_demographics.csv"):
        ti.load_train_data(folder)


def test_missing_data_file_stops_training(tiny_data, tmp_path):
    folder = _copy_data(tiny_data, tmp_path / "d")
    (folder / "train.csv").unlink()
    with pytest.raises(SystemExit, match="missing data file.*train.csv"):
        ti.main(["--data-dir", str(folder), "--output-dir", str(tmp_path / "out")])


def test_unwritable_output_folder_stops_training(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="output folder .* cannot be written"):
        ti.main(["--data-dir", str(tiny_data), "--output-dir", str(blocker / "out")])


def test_data_dir_search_order(tiny_data, tmp_path, monkeypatch):
    cfg = ti.Config()
    assert ti.locate_data_dir(str(tiny_data), cfg, force_synthetic=False) == (tiny_data, False)
    monkeypatch.setenv("CMI_DATA_DIR", str(tmp_path))
    with pytest.raises(ti.ConfigError, match="CMI_DATA_DIR=.*missing data file"):
        ti.locate_data_dir(None, ti.Config(), force_synthetic=False)


@pytest.mark.skipif(not (REAL_DIR / "train_sample.csv").exists(), reason="shared/cmi_real is absent")
def test_real_files_load_and_featurize(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(REAL_DIR / "train_sample.csv", folder / "train.csv")
    shutil.copy(REAL_DIR / "train_demographics.csv", folder / "train_demographics.csv")
    train = ti.load_train_data(folder)
    assert train["sequence_id"].n_unique() == 15
    features = ti.build_feature_table(train, mirror_left_handed=True)
    assert features.height == 15
    assert features.columns[1:] == ti.aggregate_names() + ti.DEMOGRAPHIC_FEATURES
    lin = ti.build_frame_features(train)["lin_mag"].to_numpy()
    acc = ti.build_frame_features(train)["acc_mag"].to_numpy()
    # real quaternions remove gravity: the linear part is far smaller than the raw ~9.8 m/s^2
    assert np.nanmedian(lin) < 0.3 * np.nanmedian(acc)
