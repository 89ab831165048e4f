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


def _script_with(tmp_path, name: str, old: str, new: str):
    """This script with one text edit, imported as its own module."""
    import importlib.util
    import sys
    from conftest import ROOT
    source = (ROOT / "train_infer.py").read_text()
    assert source.count(old) == 1, old
    path = tmp_path / f"{name}.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                                  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _versions(module):
    return module.frame_feature_version(True), module.feature_version(True)


def test_a_comment_or_docstring_edit_leaves_the_feature_version_unchanged(tmp_path):
    # A rerun with an edited comment must not refuse its models: the version follows numbers, not text.
    edited = _script_with(tmp_path, "edited_comment", '    """The numeric core of build_frame_features:',
                          '    """Edited. The numeric core of build_frame_features:')
    assert _versions(edited) == _versions(ti)
    edited = _script_with(tmp_path, "edited_comment2", "    # Gravity seen in the sensor frame",
                          "    # An edited comment about what follows.\n    # Gravity seen in the sensor frame")
    assert _versions(edited) == _versions(ti)


def test_a_changed_number_changes_the_feature_version(tmp_path):
    frames_changed = _script_with(tmp_path, "changed_frame", 'feats["acc_mag"] = np.linalg.norm(acc, axis=1)',
                                  'feats["acc_mag"] = np.linalg.norm(acc, axis=1) * 1.01')
    frame_version, model_version = _versions(frames_changed)
    assert frame_version != ti.frame_feature_version(True) and model_version != ti.feature_version(True)
    assert ti.feature_mismatch(frames_changed.feature_record(True, "models"), True, "models")
    # An aggregate or a deep channel that changes: the frames stay valid, the models do not.
    for name, old, new in (("changed_tail", "GESTURE_TAIL = 30", "GESTURE_TAIL = 25"),
                           ("changed_far", 'TOF_FAR = {"mean": 255.0', 'TOF_FAR = {"mean": 250.0')):
        frame_version, model_version = _versions(_script_with(tmp_path, name, old, new))
        assert frame_version == ti.frame_feature_version(True) and model_version != ti.feature_version(True), name


def test_the_probe_covers_every_path_of_the_feature_code():
    probe = ti.feature_probe_table()
    frames = ti.SequenceFrames.from_table(probe, True)
    lengths = dict(zip(frames.ids, frames.lengths))
    assert max(lengths.values()) > ti.PROBE_PAD_LEN                                 # padding keeps the last frames
    assert (probe["handedness"] == 0).any()                                         # mirroring
    assert (probe.select(ti.TOF_COLUMNS).to_numpy() == -1).any()                   # ToF "no reflection"
    by_sequence = probe.group_by("sequence_id").agg(pl.col("thm_1").is_null().all().alias("imu_only"),
                                                    pl.col("rot_w").is_null().any().alias("rot_gap"))
    assert by_sequence["imu_only"].any() and by_sequence["rot_gap"].any()          # null thm/tof and rotation
    assert ti.feature_probe_table().equals(probe)                                   # built the same every time


def test_versions_that_differ_only_in_rounding_are_the_same_features():
    record = ti.feature_record(True, "models")
    _, sums = ti.feature_probe(True, "models")
    import base64
    import zlib
    nudged = sums.copy()
    nudged[:, 1:] *= 1 + 1e-6                                   # what another libm or summation order gives
    other = {"feature_version": "from_another_pc", "feature_probe": base64.b64encode(
        zlib.compress(nudged.astype("<f8").tobytes())).decode()}
    assert ti.feature_mismatch(record, True, "models") is None
    assert ti.feature_mismatch(other, True, "models") is None
    assert ti.feature_mismatch({"feature_version": "x"}, True, "models")           # no probe: another version
