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


def test_the_quaternion_sign_changes_no_frame_feature():
    """q and -q are one rotation; the device reports rot_w >= 0, so x/y/z jump where w crosses 0. Frames with
    either sign give the same features, with rot_w >= 0."""
    quats = ti.quat_from_rotvec(np.random.default_rng(2).normal(0, 1.5, (30, 3)))
    flipped = quats * np.where(np.arange(30) % 3 == 0, -1.0, 1.0)[:, None]
    assert (quats[:, 0] < 0).any() and (flipped[:, 0] < 0).any()
    base, other = (ti.build_frame_features(_frame(30, quats=q)) for q in (quats, flipped))
    for name in ti.FRAME_FEATURES:
        np.testing.assert_allclose(other[name].to_numpy(), base[name].to_numpy(), atol=1e-5, err_msg=name)
    assert (base["rot_w"].to_numpy() >= 0).all()


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


# ── Mirroring, checked against physics: the same gesture rendered on each wrist ───────────────────────
# A small noise-free renderer of the device: an accelerometer and a quaternion from the hand's pose and motion,
# five thermopiles warmed by a nearby skin surface (a sphere), five 8x8 ToF grids whose pixels are rays cast
# to that sphere. Device frame (cm): sensors 1, 2 and 4 on the plane x = 0, 3 and 5 mirror images of each
# other; every sensor faces +z; pixel column c looks along x, row r along y.
SENSOR_AT = np.array([[0, -1.5, 0], [0, 0, 0], [1.5, 0.5, 0], [0, 1.5, 0], [-1.5, 0.5, 0]], dtype=float)
_ROWS, _COLS = np.divmod(np.arange(64), 8)
PIXEL_RAYS = np.stack([(_COLS - 3.5) * 0.12, (_ROWS - 3.5) * 0.12, np.ones(64)], axis=1)
PIXEL_RAYS /= np.linalg.norm(PIXEL_RAYS, axis=1, keepdims=True)
MIRROR = np.diag([-1.0, 1.0, 1.0])          # a vertical plane: gravity (world +z is up) is its own mirror image


def _render(position, rotation, skin, radius=6.0, layout=SENSOR_AT):
    """Raw sensor rows (n x 332) of a device at ``position`` (n x 3, cm) turned by ``rotation`` (n x 3 x 3, device
    to world), with a skin sphere centred at ``skin`` (n x 3) and its sensors at ``layout`` (device frame, cm).
    Specific force = acceleration + gravity."""
    from scipy.spatial.transform import Rotation
    n = len(position)
    acceleration = np.gradient(np.gradient(position, axis=0), axis=0) / 100.0          # cm/frame^2 -> m/s^2-ish
    force = acceleration + np.array([0.0, 0.0, ti.GRAVITY])
    acc = np.einsum("nji,nj->ni", rotation, force)                                   # R^T f: the sensor frame
    xyzw = Rotation.from_matrix(rotation).as_quat()
    quat = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    quat *= np.where(quat[:, :1] < 0, -1.0, 1.0)                                     # rot_w >= 0, as in the data
    sensors = position[:, None, :] + np.einsum("nij,kj->nki", rotation, layout)       # (n, 5, 3) in the world
    to_skin = skin[:, None, :] - sensors
    thm = 25.0 + 40.0 / (1.0 + (np.linalg.norm(to_skin, axis=2) / 5.0) ** 2)
    rays = np.einsum("nij,pj->npi", rotation, PIXEL_RAYS)                              # (n, 64, 3)
    along = np.einsum("nkd,npd->nkp", to_skin, rays)                                 # ray-sphere intersection
    miss = np.sum(to_skin ** 2, axis=2)[:, :, None] - along ** 2 - radius ** 2
    hit = along - np.sqrt(np.clip(-miss, 0, None))
    tof = np.where((miss < 0) & (hit > 0) & (hit * 10 < 254), hit * 10, -1.0)        # mm, -1 = no reflection
    return np.concatenate([acc, quat, thm, tof.reshape(n, 320)], axis=1)


def _gesture_pose():
    """(position, rotation device -> world, skin centre) of one 60-frame gesture."""
    from scipy.spatial.transform import Rotation
    t = np.arange(60, dtype=float)
    rotation = Rotation.from_rotvec(np.stack([0.9 + 0.2 * np.sin(0.3 * t), -0.5 + 0.1 * t / 60,
                                              0.4 * np.cos(0.2 * t)], axis=1)).as_matrix()
    position = np.stack([10 + 0.5 * t, 3 * np.sin(0.25 * t), 20 + 0.1 * t ** 1.5], axis=1)
    skin = position + np.einsum("nij,j->ni", rotation, [4.0, 3.0, 14.0]) + np.stack([np.sin(0.1 * t)] * 3, axis=1)
    return position, rotation, skin


def _gesture_on_a_wrist(mirrored):
    """One right-hand gesture, or the same gesture done by the left hand: the whole scene reflected in MIRROR,
    with the device (a real, right-handed object) worn on the left wrist as the mirror image of its right-wrist
    pose with its x axis reversed (device to world: MIRROR @ R @ MIRROR)."""
    position, rotation, skin = _gesture_pose()
    if mirrored:
        position, skin = position @ MIRROR, skin @ MIRROR
        rotation = MIRROR @ rotation @ MIRROR
    raw = _render(position, rotation, skin)
    frame = pl.DataFrame(raw, schema=ti.SENSOR_COLUMNS, orient="row")
    return frame.with_columns(pl.lit("SEQ_000001").alias("sequence_id"),
                              pl.lit(0 if mirrored else 1).alias("handedness"))


def test_a_gesture_on_the_left_wrist_mirrors_to_the_same_gesture_on_the_right():
    right, left = _gesture_on_a_wrist(False), _gesture_on_a_wrist(True)
    tof = right.select(ti.TOF_COLUMNS).to_numpy()
    assert 0.2 < (tof == -1).mean() < 0.8                   # the skin fills part of each grid: no symmetric case
    assert not np.allclose(right.select(ti.TOF_COLUMNS).to_numpy(), left.select(ti.TOF_COLUMNS).to_numpy())
    a, b = ti.build_frame_features(right), ti.build_frame_features(left)
    for name in ti.FRAME_FEATURES:
        np.testing.assert_allclose(b[name].to_numpy(), a[name].to_numpy(), atol=2e-4, rtol=1e-4, err_msg=name)
    unmirrored = ti.build_frame_features(left, mirror_left_handed=False)
    differ = [name for name in ti.FRAME_FEATURES if not np.allclose(unmirrored[name].to_numpy(), a[name].to_numpy(),
                                                                    atol=1e-3, equal_nan=True)]
    assert {"acc_x", "rot_y", "rot_z", "thm_3", "thm_5", "tof3_mean", "tof5_mean", "tof1_cx"} <= set(differ)


# The real device's layout as its 180-degree map implies (DATA.md: 2 <-> 4, 3 <-> 5): sensor 1 in the middle, 2
# and 4 opposite along y, 3 and 5 opposite along x.
TURN_LAYOUT = np.array([[0, 0, 0], [0, 1.5, 0], [1.5, 0, 0], [0, -1.5, 0], [-1.5, 0, 0]], dtype=float)
TURN = np.diag([-1.0, -1.0, 1.0])           # 180 degrees about the device's z axis


def test_a_device_worn_turned_reads_as_worn_the_usual_way_once_turned_back():
    """The same gesture rendered with the device worn the usual way and turned 180 degrees about its z axis (its
    pose device -> world R @ TURN): turning the raw rows back gives what the usual wearing reports, every
    accelerometer, quaternion, thermopile and ToF value."""
    position, rotation, skin = _gesture_pose()
    usual = _render(position, rotation, skin, layout=TURN_LAYOUT)
    turned = _render(position, rotation @ TURN, skin, layout=TURN_LAYOUT)
    assert not np.allclose(turned, usual)
    tof = usual[:, -320:]
    assert 0.2 < (tof == -1).mean() < 0.8 and not np.allclose(tof, turned[:, -320:])
    back = turned.copy()
    ti._turn_device_raw_inplace(back)
    np.testing.assert_allclose(back, usual, atol=1e-9)
    assert (back[:, 3] >= 0).all()                                   # rot_w >= 0, as the device reports it
    again = back.copy()
    ti._turn_device_raw_inplace(again)
    np.testing.assert_allclose(again, turned, atol=1e-12)           # its own inverse


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


def test_feature_version_tracks_settings(monkeypatch):
    """CMI_MIRROR_LEFT_HANDED changes what the features compute: the version a run saves changes with it, because
    the probe's numbers change (not only the name), and models saved with one setting are refused by the other."""
    saved_on = ti.feature_record(ti.Config().MIRROR_LEFT_HANDED, "models")
    monkeypatch.setenv("CMI_MIRROR_LEFT_HANDED", "0")
    saved_off = ti.feature_record(ti.Config().MIRROR_LEFT_HANDED, "models")
    assert saved_on["feature_version"] != saved_off["feature_version"]
    (_, on), (_, off) = ti.feature_probe(True, "models"), ti.feature_probe(False, "models")
    changed = {name for i, name in enumerate(ti.FRAME_FEATURES) if not np.allclose(on[i], off[i])}
    assert {"acc_x", "rot_y", "thm_3", "tof3_mean"} <= changed and "acc_z" not in changed
    assert ti.feature_mismatch(saved_on, False, "models") and ti.feature_mismatch(saved_off, True, "models")
    ti.feature_probe.cache_clear()                                  # computed afresh: what the cache held
    assert ti.feature_record(True, "models") == saved_on


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
