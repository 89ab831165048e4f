"""Keras branch: fp16-safe attention, mixed precision without NaN, backend portability, mask/conv alignment,
and a tiny two-fold run of all three families that trains, saves, reloads and predicts."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

keras = pytest.importorskip("keras")

import train_infer as ti  # noqa: E402
from conftest import ROOT  # noqa: E402


def _attention_output(fill_value):
    layer = ti.keras_layers().KerasTemporalAttention(fill_value=fill_value, dtype="float16")
    h = keras.ops.convert_to_tensor(np.random.default_rng(0).standard_normal((2, 11, 8)), dtype="float16")
    mask = np.ones((2, 11), dtype=np.float16)
    mask[1] = 0                                             # a row with no real step at all
    return keras.ops.convert_to_numpy(layer([h, keras.ops.convert_to_tensor(mask)])).astype(np.float32)


def test_fp16_attention_is_finite_with_65504_and_nan_with_1e9():
    out = _attention_output(ti.ATTENTION_FILL)
    assert np.isfinite(out).all()
    # Why the fix exists: -1e9 is -inf in fp16, and softmax over a row of -inf is NaN.
    seed_version = _attention_output(-1e9)
    assert np.isfinite(seed_version[0]).all() and np.isnan(seed_version[1]).all()


def _random_inputs(n, pad_len=90, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, pad_len, features)).astype(np.float32)
    mask = np.zeros((n, pad_len), np.float32)
    for i, length in enumerate(rng.integers(0, pad_len + 1, n)):
        mask[i, :length] = 1.0
    mask[0] = 0                                             # one sequence fully padded
    return x * mask[..., None], mask, rng.integers(0, len(ti.GESTURES), n)


def _small_model(features=6, pad_len=90, blocks=3, name="t"):
    return ti.build_keras_model(features, pad_len, blocks, hidden=8, name=name)


def test_one_epoch_under_mixed_precision_has_no_nan():
    x, mask, y = _random_inputs(64)
    with ti.keras_precision(True):
        model = _small_model()
        assert model.get_layer("conv_features").compute_dtype == "float16"
        assert model.get_layer("probabilities").compute_dtype == "float32"   # the head stays float32
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
        history = model.fit([x, mask], y, batch_size=32, epochs=1, verbose=0)
        probs = model.predict_on_batch([x, mask])
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(probs).all() and probs.dtype == np.float32
    assert keras.mixed_precision.global_policy().name == "float32"         # the policy is restored


@pytest.mark.parametrize("blocks,branches", [(3, False), (4, False), (3, True)])
def test_mask_is_downsampled_exactly_like_the_conv_output(blocks, branches):
    groups = [("imu", [0, 1, 2, 3]), ("thm", [4, 5])] if branches else None
    for pad_len in (29, 45, 64, 90, 127, 200):
        model = ti.build_keras_model(6, pad_len, blocks, hidden=8, name="t", branches=groups)
        conv_len = model.get_layer("conv_features").output.shape[1]
        assert model.get_layer("downsampled_mask").output.shape[1] == conv_len, (blocks, pad_len)
    mask_model = keras.Model(model.inputs, model.get_layer("downsampled_mask").output)
    mask = np.zeros((3, 200), np.float32)
    mask[0, -40:] = 1                          # 40 real frames after the padding: a step is real if any frame is
    mask[1, -1:] = 1                           # one real frame, the newest: never cropped away
    mask[2, -127:] = 1
    pooled = np.asarray(mask_model.predict_on_batch([np.zeros((3, 200, 6), np.float32), mask]))
    real = -(-40 // 2 ** blocks)
    assert pooled[0].tolist() == [0.0] * (len(pooled[0]) - real) + [1.0] * real
    assert pooled[1, -1] == 1.0
    np.testing.assert_array_equal(pooled, ti.pooled_phase_targets(mask, mask, blocks)[1])   # the phase targets' steps


def test_the_phase_head_weights_the_keras_attention_toward_gesture_steps():
    """KerasTemporalAttention with the phase logits as a third input adds their log-probability of Gesture to
    each step's logit, as TimeSeriesNet.pool does."""
    layer = ti.keras_layers().KerasTemporalAttention()
    rng = np.random.default_rng(0)
    h, mask, phase = (rng.normal(size=(2, 7, 5)).astype(np.float32), np.ones((2, 7), np.float32),
                      rng.normal(0, 3, (2, 7)).astype(np.float32))
    mask[1, :3] = 0
    layer.build([h.shape, mask.shape, phase.shape])
    layer.kernel.assign(np.zeros((5, 1), np.float32))           # the attention itself uniform
    weights = np.exp(-np.logaddexp(0, -phase)) * mask            # sigmoid(phase) on the real steps
    expected = (weights[..., None] * h).sum(axis=1) / weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(layer([h, mask, phase])), expected, rtol=1e-5, atol=1e-6)
    uniform = (mask[..., None] * h).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(layer([h, mask])), uniform, rtol=1e-5, atol=1e-6)


def test_sensor_branches_read_their_own_group_and_the_model_reloads(tmp_path):
    channels = ti.deep_channels("full")
    groups = dict(ti.sensor_branches(channels, len(channels)))
    assert list(groups) == ["imu", "thm"] + [f"tof{k}" for k in range(1, 6)]
    assert sorted(i for index in groups.values() for i in index) == list(range(len(channels)))   # each channel once
    assert [channels[i] for i in groups["tof3"]] == [f"tof3_{s}" for s in ti.TOF_STATS] + ["tof3_missing"]
    assert dict(ti.sensor_branches(ti.deep_channels("imu"), 21)) == {"imu": list(range(21))}
    model = ti.build_keras_model(len(channels), 60, 3, hidden=8, width=8, branches=list(groups.items()), name="b")
    x = np.random.default_rng(0).normal(size=(2, 60, len(channels))).astype(np.float32)
    mask = np.ones((2, 60), np.float32)
    thm = keras.Model(model.inputs, model.get_layer("thm_channels").output)
    np.testing.assert_array_equal(np.asarray(thm.predict_on_batch([x, mask])), x[..., groups["thm"]])
    branch_out = keras.Model(model.inputs, [model.get_layer(f"{g}_block_out").output for g in groups])
    before = [np.asarray(o) for o in branch_out.predict_on_batch([x, mask])]
    moved = x.copy()
    moved[..., groups["tof2"]] += 3.0                        # only the tof2 branch may see this
    after = [np.asarray(o) for o in branch_out.predict_on_batch([moved, mask])]
    assert [not np.array_equal(b, a) for b, a in zip(before, after)] == [g == "tof2" for g in groups]
    assert [o.shape[-1] for o in before] == [8] + [8] * 6     # width 8: the small groups at their floor of 8
    assert model.get_layer("branches").output.shape[1] == 60 and model.get_layer("pool1").output.shape[1] == 30
    assert "conv1" not in [layer.name for layer in model.layers]   # the branches are the first stage
    wrapped = ti.keras_inference_model(model, np.zeros(len(channels)), np.ones(len(channels)), "b_fold0")
    wrapped.save(tmp_path / "b.keras")
    again = keras.saving.load_model(tmp_path / "b.keras", compile=False)
    np.testing.assert_allclose(np.asarray(again.predict_on_batch([x, mask])),
                               np.asarray(wrapped.predict_on_batch([x, mask])), atol=1e-6)


def test_keras_auxiliary_heads_train_and_only_the_gestures_and_orientation_are_saved(tmp_path):
    keras_cfg, runtime = _cpu_config(), ti.keras_runtime(ti.KerasSpeedConfig())
    x, m, y = _fold_arrays(1, n=96)
    phase = ((np.cumsum(m, axis=1) - 1) >= m.sum(axis=1, keepdims=True) / 2).astype(np.float32) * m
    recipe = ti.RecipeConfig(ORIENTATION_WEIGHT=0.5, PHASE_WEIGHT=0.5)
    data = ti.DeepFoldData(x, m, y, ti.IMU_FRAME_FEATURES, recipe, 0, y % 4, phase)
    heads = ti.auxiliary_heads(data.recipe, data.orientation is not None, data.phase is not None)
    assert heads == {"orientations": 4, "phase_head": True}
    trainer = ti.KerasFoldTrainer(len(ti.IMU_FRAME_FEATURES), x.shape[1], keras_cfg, runtime, "keras_a", recipe, heads)
    assert trainer.model.output_names == ["probabilities", "orientation", "phase"]
    result = trainer.fit_fold(data, x[:20], m[:20], y[:20], np.ones(20, bool), 1, 0, "a", "keras_a_fold0",
                              tmp_path / "a.keras")
    assert result["probs"].shape == (20, 18) and result["orientation"].shape == (20, 4)
    np.testing.assert_allclose(result["orientation"].sum(axis=1), 1.0, atol=1e-5)
    saved = keras.saving.load_model(tmp_path / "a.keras", compile=False)
    assert tuple(saved.output.shape) == (None, 22)                # 18 gestures, then 4 orientations
    family = ti.KerasFamily([saved], ti.IMU_FRAME_FEATURES)
    inputs = ti.SequenceInputs(np.random.default_rng(5).normal(size=(50, len(ti.FRAME_FEATURES))).astype(np.float32), {})
    gestures = family.predict(inputs)
    assert gestures.shape == (18,) and inputs.orientation["keras"].shape == (4,)


def test_mixed_precision_follows_the_device_unless_forced(monkeypatch):
    runtime = ti.keras_runtime(ti.KerasSpeedConfig())
    assert runtime.mixed_precision == runtime.gpu and runtime.reason.startswith("auto")
    monkeypatch.setenv("KERAS_MP", "1")
    assert ti.keras_runtime(ti.KerasSpeedConfig()).mixed_precision is True
    monkeypatch.setenv("KERAS_MP", "0")
    assert ti.keras_runtime(ti.KerasSpeedConfig()).mixed_precision is False


TORCH_BACKEND_SCRIPT = """
import numpy as np, keras, train_infer as ti
assert keras.backend.backend() == "torch"
model = ti.build_keras_model(6, 90, 3, hidden=8)
model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
x = np.random.default_rng(0).standard_normal((8, 90, 6)).astype(np.float32)
mask = np.ones((8, 90), np.float32); mask[0] = 0
loss = float(model.train_on_batch([x, mask], np.arange(8)))
probs = np.asarray(model.predict_on_batch([x, mask]))
assert np.isfinite(loss) and np.isfinite(probs).all() and probs.shape == (8, 18), (loss, probs.shape)
print("ok", loss)
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the torch backend needs PyTorch")
def test_model_trains_one_step_under_the_torch_backend(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", TORCH_BACKEND_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_default_run_trains_saves_and_predicts_with_all_three_families(all_families_run, tiny_data):
    out, result = all_families_run
    models = out / "models"
    assert sorted(p.name for p in models.glob("keras_*")) == sorted(
        f"keras_{v}_fold{k}.keras" for v in ("imu", "full") for k in range(2))
    assert not list(models.glob("keras_*.pt")) and not list(models.glob(".keras_*"))   # no scratch left behind
    manifest = json.loads((out / "artifacts.json").read_text())
    assert set(manifest["families"]) == {"lgbm", "torch", "keras"}
    assert {(r["family"], r["route"]) for r in result["summary"]} >= {("keras", "imu"), ("keras", "full")}
    keras_folds = [r for r in result["folds"] if r["family"] == "keras"]
    assert len(keras_folds) == 4 and all(1 <= r["best_iteration"] <= r["epochs_run"] <= 2 for r in keras_folds)
    epochs = pl.read_csv(out / "epoch_log.csv").filter(pl.col("family") == "keras")
    assert epochs.height == sum(r["epochs_run"] for r in keras_folds)
    assert np.isfinite(epochs["loss"].to_numpy()).all()
    assert result["inference"]["warnings"].get("fallback", 0) == 0
    submission = pl.read_csv(out / "submission.csv")
    assert submission.height == pl.read_csv(tiny_data / "test.csv")["sequence_id"].n_unique()
    assert set(submission["gesture"]) <= set(ti.GESTURES)


def test_keras_checkpoint_reloads_and_reproduces_the_out_of_fold_probabilities(all_families_run):
    out, _ = all_families_run
    oof = pl.read_parquet(out / "oof_predictions.parquet")
    family = ti.KerasFamily.load([out / "models" / "keras_full_fold0.keras"], [], ti.FULL_CHANNELS)
    store = ti.FrameFeatureStore(out / "frame_features")
    fold0 = oof.filter((pl.col("fold") == 0) & pl.col("has_thm_tof")).head(5)
    for row in fold0.iter_rows(named=True):
        frames = store.read(row["sequence_id"])
        probs = family.predict(ti.SequenceInputs(frames, {}))
        expected = np.array([row[f"keras_full__{g}"] for g in ti.GESTURES])
        np.testing.assert_allclose(probs, expected, atol=1e-4)


def test_predict_calls_the_models_directly_not_model_predict(all_families_run, tiny_data, monkeypatch):
    ti.configure_inference(all_families_run[0])
    predictor = ti._get_predictor()
    assert [f for f, _ in predictor.models["full"]] == ["lgbm", "torch", "keras"]

    def no_model_predict(*args, **kwargs):
        raise AssertionError("model.predict() has ~100 ms of per-call set-up: predict() must not use it")

    monkeypatch.setattr(keras.Model, "predict", no_model_predict)
    test = pl.read_csv(tiny_data / "test.csv")
    demographics = pl.read_csv(tiny_data / "test_demographics.csv")
    for _, sequence, demo in list(ti._gateway_sequences(test, demographics, seed=3))[:6]:
        probs, _ = predictor.predict_proba(sequence, demo)
        assert probs.shape == (18,) and np.isfinite(probs).all()
    ti.configure_inference(None)


# ── A quiet start: TensorFlow's C++ INFO lines off unless the user asked for them ──────────────────────

def test_info_records_are_dropped_and_warnings_kept():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1795788531.934878    2726 port.cc:153] oneDNN custom operations are on.\n"
            "I0000 00:00:1795788532.239246    2726 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
            "To enable the following instructions: AVX2 FMA, rebuild TensorFlow with the appropriate compiler flags.\n"
            "W0000 00:00:1795788532.3    2726 gpu_device.cc:2] Cannot dlopen some GPU libraries.\n"
            "a line of our own\n")
    assert ti.drop_tensorflow_info_lines(text) == ("W0000 00:00:1795788532.3    2726 gpu_device.cc:2] Cannot dlopen "
                                                   "some GPU libraries.\na line of our own\n")


def test_the_log_level_is_set_only_when_the_user_did_not(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert ti.quiet_tensorflow_logs() and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert not ti.quiet_tensorflow_logs() and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


QUIET_SCRIPT = """
import sys, train_infer as ti
ti.keras_backend_and_gpu()
import tensorflow as tf
print(tf.reduce_sum(tf.ones(3)).numpy())
print("level", __import__("os").environ.get("TF_CPP_MIN_LOG_LEVEL"))
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="the chatter is TensorFlow's")
@pytest.mark.parametrize("user_level", [None, "0"])
def test_tensorflow_start_up_chatter_is_off_unless_the_user_set_the_level(tmp_path, user_level):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND")}
    env["PYTHONPATH"] = str(ROOT)
    if user_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = user_level
    proc = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"level {user_level or '1'}" in proc.stdout
    chatter = ("oneDNN custom operations" in proc.stderr, "rebuild TensorFlow" in proc.stderr)
    if user_level is None:
        assert chatter == (False, False), proc.stderr
    else:
        assert any(chatter), proc.stderr                     # the user's own level: TensorFlow's output untouched


# ── One compiled model per variant: a reused trainer trains a fold exactly as a fresh one would ────────

def _fold_arrays(seed, n=160, pad=90, features=21):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, pad, features)).astype(np.float32)
    mask = (np.arange(pad)[None, :] >= pad - rng.integers(20, pad, n)[:, None]).astype(np.float32)   # pad in front
    return x * mask[..., None], mask, rng.integers(0, len(ti.GESTURES), n)


def _cpu_config():
    return ti.resolve_device_defaults(ti.KerasConfig(), gpu=False, prefix="KERAS")


def _fold_data(seed, n=160):
    x, m, y = _fold_arrays(seed, n=n)
    return ti.DeepFoldData(x, m, y, ti.IMU_FRAME_FEATURES, ti.RecipeConfig(), seed)


def test_a_reused_trainer_trains_each_fold_exactly_as_a_fresh_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BATCH_SIZE", "64")
    keras_cfg, runtime = _cpu_config(), ti.keras_runtime(ti.KerasSpeedConfig())
    folds = [(_fold_data(1), _fold_arrays(2, n=40)), (_fold_data(3, n=150), _fold_arrays(4, n=30))]

    def fit(trainer, k):
        data, (xv, mv, yv) = folds[k]
        result = trainer.fit_fold(data, xv, mv, yv, np.ones(len(yv), bool), 2, 100 + k, f"k{k}", f"keras_t_fold{k}",
                                  tmp_path / f"{id(trainer)}_{k}.keras")
        return [h["loss"] for h in result["history"]], result["probs"]

    reused = ti.KerasFoldTrainer(21, 90, keras_cfg, runtime, "keras_t")
    first, second = fit(reused, 0), fit(reused, 1)           # fold 1 on the model fold 0 trained
    fresh = fit(ti.KerasFoldTrainer(21, 90, keras_cfg, runtime, "keras_t"), 1)
    again = fit(ti.KerasFoldTrainer(21, 90, keras_cfg, runtime, "keras_t"), 0)
    assert second[0] == fresh[0] and np.array_equal(second[1], fresh[1])      # nothing carried over between folds
    assert first[0] == again[0] and np.array_equal(first[1], again[1])        # and runs repeat
    assert first[0] != second[0]
    saved = keras.saving.load_model(tmp_path / f"{id(reused)}_1.keras")
    assert saved.name == "keras_t_fold1"                     # each fold's file carries its own name


@pytest.mark.parametrize("inner", [False, True])
def test_the_kept_keras_epoch_never_reads_the_out_of_fold_rows(tmp_path, monkeypatch, inner):
    """Two folds that differ only in their out-of-fold rows keep the same epoch and the same weights; the early
    stopping reads its own variables (KERAS_ES_MIN_DELTA as Torch reads TORCH_ES_MIN_DELTA)."""
    monkeypatch.setenv("KERAS_BATCH_SIZE", "64")
    monkeypatch.setenv("KERAS_ES_PATIENCE", "1")
    monkeypatch.setenv("KERAS_ES_MIN_DELTA", "0.25")
    stoppers, stopper = [], ti.EarlyStopper
    monkeypatch.setattr(ti, "EarlyStopper", lambda *args: stoppers.append(args) or stopper(*args))
    keras_cfg, runtime = _cpu_config(), ti.keras_runtime(ti.KerasSpeedConfig())
    trainer = ti.KerasFoldTrainer(21, 90, keras_cfg, runtime, "keras_h")
    xw, mw, yw = _fold_arrays(9, n=50)
    data = _fold_data(1)
    watch = ti.WatchSet(data.standardize(xw, mw), mw, yw, np.ones(len(yw), bool)) if inner else None
    kept = []
    for valid_seed in (2, 3):
        xv, mv, yv = _fold_arrays(valid_seed, n=40)
        path = tmp_path / f"v{valid_seed}.keras"
        result = trainer.fit_fold(data, xv, mv, yv, np.ones(len(yv), bool), 3, 7, "h", "keras_h_fold0", path, watch)
        kept.append((result["epoch"], keras.saving.load_model(path).get_weights()))
    assert kept[0][0] == kept[1][0] and (inner or kept[0][0] == 3)
    assert all(np.array_equal(a, b) for a, b in zip(kept[0][1], kept[1][1]))
    assert stoppers == [(1, 0.25)] * 2


def test_keras_trains_on_a_new_augmented_epoch_each_epoch(tmp_path, monkeypatch):
    """Keras trains on DeepFoldData.epoch(0), epoch(1), ...: never the first epoch again."""
    monkeypatch.setenv("KERAS_BATCH_SIZE", "64")
    seen = []
    original = ti.DeepFoldData.epoch
    monkeypatch.setattr(ti.DeepFoldData, "epoch", lambda self, epoch: seen.append(epoch) or original(self, epoch))
    trainer = ti.KerasFoldTrainer(21, 90, _cpu_config(), ti.keras_runtime(ti.KerasSpeedConfig()), "keras_e")
    xv, mv, yv = _fold_arrays(2, n=40)
    trainer.fit_fold(_fold_data(1), xv, mv, yv, np.ones(len(yv), bool), 3, 0, "e", "keras_e_fold0",
                     tmp_path / "e.keras")
    assert seen[:3] == [0, 1, 2]


def test_keras_saved_standardisation_equals_the_numpy_one():
    """The saved model's FoldStandardize + MaskFrames give what standardize_frames gives (missing -> 0,
    padding 0), so Keras and Torch read the same inputs at inference."""
    rng = np.random.default_rng(0)
    x, mask, _ = _random_inputs(6, features=6)
    x = x + 3.0
    x[rng.random(x.shape) < 0.2] = np.nan
    mean, std = rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32)
    wrapped = ti.keras_inference_model(_small_model(), mean, std, "wrapped")
    front = keras.Model(wrapped.inputs, wrapped.get_layer("mask_frames").output)
    np.testing.assert_allclose(np.asarray(front.predict_on_batch([x, mask])), ti.standardize_frames(x, mask, mean, std),
                               atol=1e-5)


@pytest.mark.parametrize("gpu,mixed", [(None, False), (("Tesla P100-PCIE-16GB", (6, 0), False), False),
                                       (("Tesla T4", (7, 5), False), True), (("NVIDIA H100", (9, 0), True), True)])
def test_keras_mixed_precision_only_from_compute_capability_7(gpu, mixed, monkeypatch):
    monkeypatch.setattr(ti, "keras_backend_and_gpu", lambda: ("tensorflow", gpu))
    runtime = ti.keras_runtime(ti.KerasSpeedConfig())
    assert runtime.gpu == (gpu is not None) and runtime.mixed_precision is mixed
    assert runtime.reason.startswith("auto: " + ("CPU" if gpu is None else f"{gpu[0]}, compute"))
    monkeypatch.setenv("KERAS_MP", "1")                     # forcing it still wins
    assert ti.keras_runtime(ti.KerasSpeedConfig()).mixed_precision is True
