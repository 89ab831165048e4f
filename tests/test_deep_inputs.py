"""The deep models' inputs: channels that mean what they say, missing-value statistics, augmentation that keeps
shapes, masks and labels consistent and never runs at inference."""
import dataclasses

import numpy as np
import pytest

import train_infer as ti

FULL = ti.FULL_CHANNELS


def _frames(n=12, seed=0):
    """n frames of plausible frame features: every sensor present, ToF sensors seeing something."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 1, (n, len(ti.FRAME_FEATURES))).astype(np.float32)
    for k in range(1, 6):
        values[:, ti.FRAME_FEATURES.index(f"tof{k}_valid")] = 0.5
        values[:, ti.FRAME_FEATURES.index(f"tof{k}_mean")] = 80.0
    values[:, ti.THM_RAW_INDEX] = 30.0
    return values


def test_a_missing_sensor_gets_its_indicator_and_a_standardised_zero():
    values = _frames()
    values[:4, ti.THM_RAW_INDEX[:2]] = np.nan                       # two thermopiles null on 4 frames
    tof3 = [ti.FRAME_FEATURES.index(f"tof3_{s}") for s in ti.TOF_STATS]
    values[:, tof3] = np.nan                                         # ToF sensor 3 null throughout
    channels = ti.deep_frame_channels(values, "full")
    assert channels.shape == (12, len(FULL))
    assert channels[:4, FULL.index("thm_missing")] == pytest.approx(0.4)
    assert (channels[4:, FULL.index("thm_missing")] == 0).all()
    assert (channels[:, FULL.index("tof3_missing")] == 1).all() and (channels[:, FULL.index("tof1_missing")] == 0).all()
    mask = np.ones(12, np.float32)
    mean, std = ti.frame_statistics(channels[None], mask[None])
    z = ti.standardize_frames(channels[None], mask[None], mean, std)[0]
    assert np.isfinite(z).all()
    assert (z[:, FULL.index("tof3_mean")] == 0).all() and (z[:4, FULL.index("thm_1")] == 0).all()
    assert (z[:, FULL.index("thm_missing")] != 0).any()             # the indicator still tells them apart


def test_statistics_leave_missing_values_out():
    x = np.array([[[30.0], [np.nan], [32.0], [0.0]]], np.float32)    # last frame is padding
    mask = np.array([[1, 1, 1, 0]], np.float32)
    mean, std = ti.frame_statistics(x, mask)
    assert mean[0] == pytest.approx(31.0) and std[0] == pytest.approx(1.0)   # a null is no 0 degC reading
    empty_mean, empty_std = ti.frame_statistics(np.full((1, 3, 1), np.nan, np.float32), np.ones((1, 3), np.float32))
    assert empty_mean[0] == 0 and empty_std[0] == 1


def test_a_blind_tof_sensor_reads_far_and_a_null_one_reads_missing():
    values = _frames()
    for stat in ("mean", "min", "std", "cx", "cy"):
        values[:, ti.FRAME_FEATURES.index(f"tof2_{stat}")] = np.nan  # what _tof_frame_stats gives for all -1
    values[:, ti.FRAME_FEATURES.index("tof2_valid")] = 0.0
    channels = ti.deep_frame_channels(values, "full")
    assert (channels[:, FULL.index("tof2_mean")] == 255).all() and (channels[:, FULL.index("tof2_min")] == 255).all()
    assert (channels[:, FULL.index("tof2_std")] == 0).all() and (channels[:, FULL.index("tof2_missing")] == 0).all()
    raw = np.full((1, 320), -1.0, np.float32)                        # the raw path agrees: all -1 is blind
    stats = ti._tof_frame_stats(raw)
    assert stats[0, 0, ti.TOF_STATS.index("valid")] == 0 and np.isnan(stats[0, 0, ti.TOF_STATS.index("mean")])


def test_imu_channels_are_the_imu_frame_features():
    values = _frames()
    assert ti.deep_channels("imu") == ti.IMU_FRAME_FEATURES
    np.testing.assert_array_equal(ti.deep_frame_channels(values, "imu"), values[:, ti.IMU_FRAME_INDEX])
    assert ti.variant_of_channels(ti.deep_channels("full")) == "full"
    with pytest.raises(ValueError, match="input channels"):
        ti.variant_of_channels(ti.FRAME_FEATURES)


# ── Augmentation ───────────────────────────────────────────────────────────────────────────────────────

def _batch(variant="full", n=24, pad=60, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, pad + 30, n)
    x = np.zeros((n, pad, len(ti.deep_channels(variant))), np.float32)
    mask = np.zeros((n, pad), np.float32)
    for i, length in enumerate(lengths):
        frames = ti.deep_frame_channels(_frames(length, seed=i), variant)
        frames[:, ti.deep_channels(variant).index("rot_w"):][:, :4] /= np.linalg.norm(
            frames[:, ti.deep_channels(variant).index("rot_w"):][:, :4], axis=1, keepdims=True)
        x[i], mask[i] = ti.pad_last_frames(frames, pad)
    return x, mask, rng.integers(0, len(ti.GESTURES), n)


ALL_ON = ti.RecipeConfig(PROBABILITY=1.0, SENSOR_DROPOUT=0.5)


@pytest.mark.parametrize("variant", ["imu", "full"])
def test_each_epoch_keeps_shapes_masks_and_labels_consistent(variant):
    x, mask, y = _batch(variant)
    data = ti.DeepFoldData(x, mask, y, ti.deep_channels(variant), ALL_ON, seed=3)
    z, m, targets = data.epoch(0)[:3]
    assert z.shape == x.shape and m.shape == mask.shape and targets.shape == (len(y), len(ti.GESTURES))
    assert np.isfinite(z).all() and z.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert ((m[:, 1:] >= m[:, :-1]).all())                          # padding first, then the real frames
    assert (m[:, -1] == 1).all()                                     # the last frame at the last position
    assert (z[m == 0] == 0).all()                                    # padding stays exactly 0
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
    assert (targets.min() >= 0) and targets.max() < 1.0              # smoothed, and mixed
    again = data.epoch(0)
    assert all(np.array_equal(a, b) for a, b in zip((z, m, targets), again))   # an epoch repeats
    assert not np.array_equal(z, data.epoch(1)[0])                   # and the next one differs


def test_without_augmentation_an_epoch_is_the_standardised_data_shuffled():
    x, mask, y = _batch()
    off = ti.RecipeConfig(STRETCH=0, CROP=0, ROTATION_DEG=0, JITTER=0, NOISE=0, SENSOR_DROPOUT=0, MIXUP=0,
                          LABEL_SMOOTHING=0)
    data = ti.DeepFoldData(x, mask, y, FULL, off, seed=0)
    z, m, targets = data.epoch(0)[:3]
    order = targets.argmax(axis=1)
    reference = ti.standardize_frames(x, mask, data.mean, data.std)
    rows = [np.flatnonzero([np.array_equal(z[i], r) for r in reference])[0] for i in range(len(y))]
    assert sorted(rows) == list(range(len(y))) and (y[rows] == order).all()
    assert (targets.max(axis=1) == 1).all()


def test_rotation_turns_every_imu_vector_and_the_quaternion_together():
    x, mask, y = _batch("imu", n=6)
    idx = {name: ti.IMU_FRAME_FEATURES.index(name) for name in ti.IMU_FRAME_FEATURES}
    quat, grav = [idx[n] for n in ti.QUATERNION], [idx[n] for n in ("grav_x", "grav_y", "grav_z")]
    q = np.random.default_rng(1).normal(size=x.shape[:2] + (4,))
    x[..., quat] = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x[..., grav] = ti.quat_rotate(ti.quat_conj(x[..., quat]), np.array([0.0, 0.0, 1.0]))   # gravity from q
    x *= mask[..., None]
    recipe = ti.RecipeConfig(PROBABILITY=1.0, STRETCH=0, CROP=0, ROTATION_DEG=30, SENSOR_DROPOUT=0)
    turned, turned_mask = ti.augment_in_sensor_units(x, mask, ti.IMU_FRAME_FEATURES, recipe,
                                                     np.random.default_rng(0))
    assert np.array_equal(turned_mask, mask)
    for names in ti.IMU_VECTORS:                                    # lengths kept, directions changed
        cols = [idx[n] for n in names]
        np.testing.assert_allclose(np.linalg.norm(turned[..., cols], axis=-1), np.linalg.norm(x[..., cols], axis=-1),
                                   rtol=1e-4, atol=1e-5)
        assert not np.allclose(turned[..., cols], x[..., cols])
    for name in ("acc_mag", "lin_mag", "ang_dist", "lin_jerk"):      # magnitudes untouched
        assert np.array_equal(turned[..., idx[name]], x[..., idx[name]])
    # Gravity derived from the turned quaternion is the turned gravity channel: the two stay consistent.
    real = mask > 0
    assert (x[..., quat[0]][real] < 0).any() and (turned[..., quat[0]][real] >= 0).all()   # the data's sign, w >= 0
    derived = ti.quat_rotate(ti.quat_conj(turned[..., quat][real].astype(np.float64)), np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(derived, turned[..., grav][real], atol=1e-4)


def test_sensor_dropout_sets_the_group_missing_and_its_indicator():
    x, mask, y = _batch("full")
    recipe = ti.RecipeConfig(PROBABILITY=0.0, SENSOR_DROPOUT=1.0)     # every group of every sequence dropped
    dropped, _ = ti.augment_in_sensor_units(x, mask, FULL, recipe, np.random.default_rng(0))
    for names, indicator in ti.SENSOR_GROUPS.values():
        assert np.isnan(dropped[..., [FULL.index(n) for n in names]]).all()
        assert (dropped[..., FULL.index(indicator)] == 1).all()
    imu = [FULL.index(n) for n in ti.IMU_FRAME_FEATURES]
    assert np.array_equal(dropped[..., imu], x[..., imu])            # the IMU is never dropped


def test_stretch_and_crop_keep_the_end_of_the_gesture():
    x, mask, y = _batch("imu", n=10, pad=60)
    x[..., 0] = (np.cumsum(mask, axis=1) - 1) * mask                  # the real frame's index as a channel
    recipe = ti.RecipeConfig(PROBABILITY=1.0, ROTATION_DEG=0, SENSOR_DROPOUT=0)
    out, out_mask = ti.augment_in_sensor_units(x, mask, ti.IMU_FRAME_FEATURES, recipe, np.random.default_rng(1))
    assert not np.array_equal(out_mask, mask)
    for i in range(10):
        real = int(out_mask[i].sum())
        assert real >= 2 and (out[i, :60 - real] == 0).all() and (out_mask[i, 60 - real:] == 1).all()   # pad in front
        assert out[i, -1, 0] == mask[i].sum() - 1                    # the last frame is still the last frame
        assert (np.diff(out[i, 60 - real:, 0]) >= 0).all()           # time still runs forward


def _labelled_batch(n=18, pad=60):
    """A batch whose acc_x is each real frame's index, whose second half of frames is the gesture, whose labels
    are the row numbers (each row recognisable after the shuffle) and whose orientation is known for most rows."""
    x, mask, _ = _batch("imu", n=n, pad=pad)
    index = np.cumsum(mask, axis=1) - 1
    x[..., 0] = index * mask
    phase = (index >= mask.sum(axis=1, keepdims=True) / 2).astype(np.float32) * mask
    return x, mask, np.arange(n) % len(ti.GESTURES), np.arange(n) % 5 - 1, phase


def test_phase_labels_move_with_their_frames_and_orientation_with_its_sequence():
    x, mask, y, orientation, phase = _labelled_batch()
    recipe = ti.RecipeConfig(PROBABILITY=1.0, ROTATION_DEG=0, SENSOR_DROPOUT=0, JITTER=0, NOISE=0, MIXUP=0)
    data = ti.DeepFoldData(x, mask, y, ti.IMU_FRAME_FEATURES, recipe, 3, orientation, phase)
    epoch = data.epoch(0)
    assert not np.array_equal(np.sort(epoch.mask.sum(axis=1)), np.sort(mask.sum(axis=1)))   # crop/stretch ran
    frame = np.rint(epoch.x[..., 0] * data.std[0] + data.mean[0])               # each frame's source index
    for row in range(len(y)):
        i = int(epoch.targets[row].argmax())                                    # the source sequence
        real = epoch.mask[row] > 0
        half = mask[i].sum() / 2
        np.testing.assert_array_equal(epoch.phase[row, real], (frame[row, real] >= half).astype(np.float32))
        assert (epoch.phase[row, ~real] == 0).all()
        expected = np.zeros(4) if orientation[i] < 0 else np.eye(4)[orientation[i]]
        np.testing.assert_array_equal(epoch.orientation[row], expected)
    plain = ti.DeepFoldData(x, mask, y, ti.IMU_FRAME_FEATURES, recipe, 3).epoch(0)
    assert plain.orientation is None and plain.phase is None
    assert np.array_equal(plain.x, epoch.x) and np.array_equal(plain.mask, epoch.mask)   # no draws of their own


def test_mixup_mixes_the_auxiliary_targets_as_the_gestures():
    x, mask, y, orientation, phase = _labelled_batch()
    recipe = ti.RecipeConfig(PROBABILITY=1.0, LABEL_SMOOTHING=0.0)
    epoch = ti.DeepFoldData(x, mask, y, ti.IMU_FRAME_FEATURES, recipe, 5, orientation, phase).epoch(0)
    mixed = epoch.targets.max(axis=1) < 1.0
    assert mixed.any()
    assert ((epoch.phase >= 0) & (epoch.phase <= 1)).all() and (epoch.phase[epoch.mask == 0] == 0).all()
    assert (epoch.orientation.sum(axis=1) <= 1 + 1e-6).all()
    assert (epoch.orientation[mixed].max(axis=1) < 1.0).any()                  # mixed rows carry two orientations


def _inference_family(family):
    """A loaded family of two untrained full-route nets, as predict() holds them."""
    if family == "torch":
        torch = pytest.importorskip("torch")
        nets = [ti.build_time_series_net(len(FULL), hidden=8) for _ in range(2)]
        checkpoints = [{"state_dict": net.state_dict(), "mean": torch.zeros(len(FULL)), "std": torch.ones(len(FULL)),
                        "pad_len": 90, "channels": FULL, "in_features": len(FULL), "pools": 3, "hidden": 8,
                        "dropout": 0.3} for net in nets]
        return ti.TorchFamily(checkpoints, FULL)
    pytest.importorskip("keras")
    models = [ti.keras_inference_model(ti.build_keras_model(len(FULL), 90, 3, hidden=8, name=f"n{k}"),
                                       np.zeros(len(FULL)), np.ones(len(FULL)), f"m{k}") for k in range(2)]
    return ti.KerasFamily(models, FULL)


@pytest.mark.parametrize("family", ["torch", "keras"])
def test_augmentation_never_runs_at_inference(family, monkeypatch):
    """predict()'s models neither call the augmentation nor run in training mode (dropout is random there): the
    same sequence gets the same finite answer every time."""
    def forbidden(*args, **kwargs):
        raise AssertionError("augmentation at inference")

    monkeypatch.setattr(ti, "augment_in_sensor_units", forbidden)
    monkeypatch.setattr(ti, "augment_standardized", forbidden)
    loaded = _inference_family(family)
    inputs = ti.SequenceInputs(_frames(50), {})
    answers = [loaded.predict(inputs) for _ in range(3)]
    assert np.isfinite(answers[0]).all() and all(np.array_equal(answers[0], a) for a in answers[1:])


def test_recipe_switches_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUG_ROTATION_DEG", "0")
    monkeypatch.setenv("DEEP_SELECTION", "inner")
    recipe = ti.RecipeConfig()
    assert recipe.ROTATION_DEG == 0 and recipe.SELECTION == "inner"
    assert dataclasses.replace(recipe, MIXUP=0).MIXUP == 0


def test_the_watch_rows_are_training_subjects_never_the_out_of_fold_ones():
    import polars as pl
    rng = np.random.default_rng(0)
    subjects = np.repeat([f"S{i}" for i in range(10)], 20)
    sequences = pl.DataFrame({"subject": subjects, "label": rng.integers(0, 18, len(subjects))})
    folds = ti.make_folds(sequences, 5, 0)
    for fold in range(5):
        fit, watch = ti.inner_watch_split(sequences, folds, fold, 0)
        assert len(set(fit) & set(watch)) == 0 and (folds[fit] != fold).all() and (folds[watch] != fold).all()
        assert sorted(np.concatenate([fit, watch])) == list(np.flatnonzero(folds != fold))
        assert not set(subjects[fit]) & set(subjects[watch])          # grouped by subject


def test_both_families_keep_the_last_epoch_or_the_watch_sets_best_and_stop_on_a_nan_loss():
    """EpochKeeper, shared by the Torch and Keras loops: the out-of-fold rows never choose the kept epoch, and a
    loss that is not finite stops the fold with an error naming it."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(ti.GESTURES), 40)
    right, wrong = np.eye(len(ti.GESTURES))[y], np.eye(len(ti.GESTURES))[(y + 1) % len(ti.GESTURES)]
    watch = ti.WatchSet(np.zeros((40, 4, 2), np.float32), np.ones((40, 4), np.float32), y, np.ones(40, bool))
    # Out-of-fold rows best at epoch 1, the watch set best at epoch 2: inner keeps 2, fixed keeps the last (3).
    oof_probs, watch_probs = [right, wrong, wrong], [wrong, right, wrong]
    for watched, expected in ((None, 3), (watch, 2)):
        keeper = ti.EpochKeeper("k", y, np.ones(40, bool), watched, patience=5, min_delta=0.0)
        for epoch in range(3):
            keeper.end_epoch(1.0, oof_probs[epoch], lambda x, m, e=epoch: watch_probs[e], 1e-3, 0.1,
                             lambda e=epoch: f"weights {e + 1}")
        result = keeper.result(3, lambda: "weights 3")
        assert result["epoch"] == expected and result["state"] == f"weights {expected}"
        assert result["oof_chosen"]["epoch"] == 1                   # reported, never used
    with pytest.raises(FloatingPointError, match="k: the training loss is nan at epoch 1"):
        ti.EpochKeeper("k", y, np.ones(40, bool), None, 5, 0.0).end_epoch(float("nan"), right, None, 1e-3, 0.1,
                                                                          lambda: None)


def _raw_full_route_fold(n, seed):
    """Full-route channels at sensor magnitudes (ToF up to 255, thm ~30 degrees), with missing values and padding."""
    rng = np.random.default_rng(seed)
    channels = ti.deep_channels("full")
    x = rng.standard_normal((n, 90, len(channels))).astype(np.float32) * 40 + 120
    x[rng.random(x.shape) < 0.05] = np.nan
    mask = (np.arange(90)[None, :] < rng.integers(20, 90, n)[:, None]).astype(np.float32)
    return x * mask[..., None], mask, rng.integers(0, len(ti.GESTURES), n), channels


@pytest.mark.parametrize("family", ["torch", "keras"])
def test_every_augmentation_under_half_precision_gives_finite_losses_and_probabilities(family, tmp_path):
    """The whole recipe (crop, stretch, rotation, sensor dropout, gain, noise, mixup, smoothing) on raw-scale
    inputs with missing values, trained under reduced precision: bf16 autocast for Torch (the GPU's choice; CPU
    autocast here), mixed_float16 for Keras. No NaN loss (EpochKeeper would raise), no NaN probability."""
    x, mask, y, channels = _raw_full_route_fold(96, 0)
    xv, mv, yv, _ = _raw_full_route_fold(32, 1)
    data = ti.DeepFoldData(x, mask, y, channels, ti.RecipeConfig(), 0)
    if family == "torch":
        torch = pytest.importorskip("torch")
        cfg = dataclasses.replace(ti.resolve_device_defaults(ti.DLConfig(), gpu=False, prefix="DL"), EPOCHS=2, HIDDEN=16)
        result = ti.train_torch_fold(data, xv, mv, yv, np.ones(32, bool), dl_cfg=cfg,
                                     runtime=ti.TorchRuntime(torch.device("cpu"), torch.bfloat16), seed=0, label="bf16",
                                     micro_batch=32, accum_steps=1)
    else:
        keras = pytest.importorskip("keras")
        cfg = dataclasses.replace(ti.resolve_device_defaults(ti.KerasConfig(), gpu=False, prefix="KERAS"), HIDDEN=16,
                                  BATCH_SIZE=32)
        runtime = dataclasses.replace(ti.keras_runtime(ti.KerasSpeedConfig()), mixed_precision=True)
        with ti.keras_precision(True):
            trainer = ti.KerasFoldTrainer(len(channels), 90, cfg, runtime, "keras_mp")
            assert trainer.model.get_layer("conv_features").compute_dtype == "float16"
            result = trainer.fit_fold(data, xv, mv, yv, np.ones(32, bool), 2, 0, "fp16", "keras_mp_fold0",
                                      tmp_path / "keras_mp.keras")
        assert keras.mixed_precision.global_policy().name == "float32"
    assert len(result["history"]) == 2 and all(np.isfinite(h["loss"]) for h in result["history"])
    assert np.isfinite(result["probs"]).all()
