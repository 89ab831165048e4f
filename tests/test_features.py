"""Frame features: physics, ToF -1 handling, mirroring, and one function for a table or one sequence."""
import numpy as np
import polars as pl
import pytest

import train_infer as ti


def _frame(n, quats=None, acc=None, thm=None, tof=None, seq="SEQ_000001", handedness=None):
    rng = np.random.default_rng(0)
    quats = quats if quats is not None else ti.quat_from_rotvec(rng.normal(0, 1, (n, 3)))
    acc = acc if acc is not None else ti.quat_rotate(ti.quat_conj(quats), np.array([0, 0, ti.GRAVITY]))
    thm = thm if thm is not None else rng.uniform(24, 34, (n, 5))
    tof = tof if tof is not None else rng.integers(-1, 255, (n, 320)).astype(float)
    data = {"sequence_id": [seq] * n}
    data |= {c: acc[:, i] for i, c in enumerate(["acc_x", "acc_y", "acc_z"])}
    data |= {c: quats[:, i] for i, c in enumerate(["rot_w", "rot_x", "rot_y", "rot_z"])}
    data |= {c: thm[:, i] for i, c in enumerate(ti.THM_COLUMNS)}
    data |= {c: tof[:, i] for i, c in enumerate(ti.TOF_COLUMNS)}
    frame = pl.DataFrame(data)
    if handedness is not None:
        frame = frame.with_columns(pl.lit(handedness).alias("handedness"))
    return frame


def test_quaternion_helpers_round_trip():
    rotvec = np.random.default_rng(1).normal(0, 1, (50, 3))
    rotvec = rotvec[np.linalg.norm(rotvec, axis=1) < np.pi]   # beyond pi the short way round is another vector
    assert np.allclose(ti.quat_to_rotvec(ti.quat_from_rotvec(rotvec)), rotvec, atol=1e-9)
    v = np.array([1.0, 2.0, 3.0])
    q = ti.quat_from_rotvec(rotvec)
    assert np.allclose(ti.quat_rotate(ti.quat_conj(q), ti.quat_rotate(q, v)), v)


def test_gravity_is_removed_through_the_quaternion():
    feats = ti.build_frame_features(_frame(40))              # device still: acc is pure gravity
    assert np.allclose(feats["lin_mag"].to_numpy(), 0, atol=1e-4)
    assert np.allclose(feats["acc_mag"].to_numpy(), ti.GRAVITY, atol=1e-4)


def test_angular_velocity_and_distance_between_frames():
    n, step = 20, 0.1
    quats = ti.quat_from_rotvec(np.stack([np.zeros(n), np.zeros(n), step * np.arange(n)], axis=1))
    feats = ti.build_frame_features(_frame(n, quats=quats))
    assert feats["ang_vel_z"][0] == 0 and feats["ang_dist"][0] == 0  # first frame: no previous frame
    assert np.allclose(feats["ang_vel_z"].to_numpy()[1:], step, atol=1e-5)
    assert np.allclose(feats["ang_dist"].to_numpy()[1:], step, atol=1e-5)


def test_tof_minus_one_is_missing_not_a_distance():
    n = 4
    tof = np.full((n, 320), -1.0)
    tof[:, :32] = 100.0                                      # sensor 1: half the pixels see 100, half nothing
    tof[:, 64:128] = np.nan                                   # sensor 2: null sensor
    feats = ti.build_frame_features(_frame(n, tof=tof))
    assert feats["tof1_mean"].to_list() == [100.0] * n       # not (100 x 32 - 32) / 64
    assert feats["tof1_valid"].to_list() == [0.5] * n
    assert feats["tof2_valid"].null_count() == n             # a null sensor is unknown, not "nothing seen"
    assert feats["tof3_mean"].null_count() == n and feats["tof3_valid"].to_list() == [0.0] * n


def test_left_handed_rows_are_mirrored_to_right_handed():
    right = _frame(30, handedness=1)
    raw = ti.sensor_matrix(right)
    ti._mirror_raw_inplace(raw)                              # what the same motion reads on the left wrist
    left = pl.DataFrame({c: raw[:, i].astype(np.float64) for i, c in enumerate(ti.SENSOR_COLUMNS)}).with_columns(
        pl.lit("SEQ_000001").alias("sequence_id"), pl.lit(0).alias("handedness"))
    a, b = ti.build_frame_features(right), ti.build_frame_features(left)
    for name in ti.FRAME_FEATURES:
        assert np.allclose(a[name].to_numpy(), b[name].to_numpy(), atol=1e-4, equal_nan=True), name
    not_mirrored = ti.build_frame_features(left, mirror_left_handed=False)
    assert not np.allclose(a["acc_x"].to_numpy(), not_mirrored["acc_x"].to_numpy())


def test_table_gives_the_same_frames_as_each_sequence_alone():
    parts = [_frame(n, seq=f"SEQ_{i:06d}") for i, n in enumerate((35, 1, 60))]
    table = ti.build_frame_features(pl.concat(parts))
    alone = pl.concat([ti.build_frame_features(p) for p in parts])
    assert table.equals(alone)                               # differences never cross a sequence boundary
    aggregated = ti.aggregate_features(table)
    one_by_one = pl.concat([ti.aggregate_features(ti.build_frame_features(p).drop("sequence_id")) for p in parts])
    assert aggregated.drop("sequence_id").equals(one_by_one)


def test_aggregate_names_and_variants():
    frames = ti.build_frame_features(_frame(50))
    aggregated = ti.aggregate_features(frames)
    assert aggregated.columns == ["sequence_id"] + ti.aggregate_names()
    imu = ti.feature_columns("imu")
    assert not [c for c in imu if c.startswith(("thm", "tof"))]
    assert set(imu) < set(ti.feature_columns("full"))
    with pytest.raises(ValueError):
        ti.feature_columns("thermal")


def test_null_rotation_gives_missing_physics_not_garbage():
    frame = _frame(10).with_columns([pl.lit(None, pl.Float64).alias(c) for c in ("rot_w", "rot_x", "rot_y", "rot_z")])
    feats = ti.build_frame_features(frame)
    assert feats["lin_mag"].null_count() == 10
    assert feats["acc_mag"].null_count() == 0


def test_feature_version_tracks_settings():
    assert ti.feature_version(True) != ti.feature_version(False)
    assert ti.feature_version(True) == ti.feature_version(True)
