"""Torch branch: mask/conv alignment, fp16-safe attention, EarlyStopper, accumulation in training mode, OOM
fallback, the precision decision, stacked inference, and the default run's Torch models saved and reloaded."""
import json

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")

import train_infer as ti  # noqa: E402
from conftest import models_of  # noqa: E402


@pytest.mark.parametrize("pools", [2, 3, 4])
def test_mask_is_downsampled_exactly_like_the_signal(pools):
    net = ti.build_time_series_net(5, pools=pools, hidden=8).eval()
    assert len(net.pools) == pools                          # derived from the layers
    for pad_len in range(29, 201):
        x = torch.zeros(2, pad_len, 5)
        conv_len = net.conv(x.transpose(1, 2)).shape[2]
        assert net.downsample_mask(torch.ones(2, pad_len)).shape[1] == conv_len, (pools, pad_len)


def test_pooling_drops_the_oldest_step_never_the_newest():
    """The padding is in front, so the last step is the gesture's end: on an odd length the pooling drops the
    first step (MaxPool1d alone drops the last). Eval mode (reshape + max, for vmap) and training agree."""
    pool = ti.build_time_series_net(5, pools=3, hidden=8).pools[0]
    for length in (29, 44, 90, 91):
        x = torch.randn(3, 6, length)
        expected = torch.nn.functional.max_pool1d(x[..., length % 2:], 2)
        torch.testing.assert_close(pool.eval()(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(pool.train()(x), expected, rtol=0, atol=0)
        x[..., -1] = 100.0                                  # the newest step always reaches the output
        assert (pool.eval()(x)[..., -1] == 100.0).all()


def test_mask_downsampling_keeps_real_steps_and_the_newest():
    net = ti.build_time_series_net(5, pools=3, hidden=8)
    mask = torch.zeros(1, 90)
    mask[0, -20:] = 1                                       # padding, then 20 real frames (front padding)
    assert net.downsample_mask(mask)[0].tolist() == [0.0] * 8 + [1.0] * 3   # 20 frames -> the last 3 of 11 steps
    mask = torch.zeros(1, 90)
    mask[0, -1:] = 1                                        # one real frame, the newest: still a real step
    assert net.downsample_mask(mask)[0].tolist() == [0.0] * 10 + [1.0]


@pytest.mark.parametrize("pools", [1, 2, 3, 4])
def test_pooled_phase_targets_follow_the_nets_pooling(pools):
    """The phase head learns at the pooled resolution: its targets' real steps are the net's pooled mask, and
    each real step's target is the share of its real frames that are Gesture frames."""
    net = ti.build_time_series_net(5, pools=pools, hidden=8).eval()
    rng = np.random.default_rng(pools)
    for pad_len in (29, 60, 90, 91, 120, 127):
        lengths = rng.integers(1, pad_len + 1, 8)
        mask = (np.arange(pad_len)[None, :] >= pad_len - lengths[:, None]).astype(np.float32)
        share, real = ti.pooled_phase_targets(mask, mask, pools)               # every real frame a Gesture frame
        np.testing.assert_array_equal(real, net.downsample_mask(torch.from_numpy(mask)).numpy())
        assert (share[real > 0] == 1).all() and (share[real == 0] == 0).all()
    # By hand, one stage: [pad, pad, T, G, G] -> the oldest step dropped -> pairs (pad, T), (G, G)
    share, real = ti.pooled_phase_targets(np.array([[0, 0, 0, 1, 1]]), np.array([[0, 0, 1, 1, 1]]), 1)
    assert share.tolist() == [[0.0, 1.0]] and real.tolist() == [[1.0, 1.0]]


def test_the_phase_head_weights_the_attention_toward_gesture_steps():
    """With the phase head, each step's attention logit gains the head's log-probability of Gesture."""
    net = ti.build_time_series_net(4, pools=1, hidden=8, phase_head=True).eval()
    with torch.no_grad():
        net.attention.weight.zero_()                          # the attention itself uniform
        net.attention.bias.zero_()
    h, m = torch.randn(2, 7, 16), torch.ones(2, 7)
    m[1, :3] = 0
    pooled, phase = net.pool(h, m)
    weights = torch.sigmoid(phase) * m                       # softmax(log sigmoid) over the real steps
    expected = (weights.unsqueeze(-1) * h).sum(1) / weights.sum(1, keepdim=True)
    torch.testing.assert_close(pooled[:, :16], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled[:, :16], (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True), atol=1e-3)


def test_auxiliary_losses_add_with_their_weights():
    """training_loss = gesture cross-entropy + w_o x orientation cross-entropy + w_p x the phase's binary
    cross-entropy over the real pooled steps; an unknown orientation (a row of zeros) adds nothing."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    net = ti.build_time_series_net(4, pools=2, hidden=8, dropout=0.0, orientations=4, phase_head=True).eval()
    x, mask = torch.randn(6, 40, 4), torch.ones(6, 40)
    mask[2, :25] = 0
    targets = torch.softmax(torch.randn(6, 18), 1)
    orientation = F.one_hot(torch.tensor([0, 1, 2, 3, 0, 1]), 4).float()
    orientation[5] = 0                                       # unknown
    phase = (torch.arange(40) >= 20).float().expand(6, 40) * mask
    share, real = (torch.from_numpy(a) for a in ti.pooled_phase_targets(phase.numpy(), mask.numpy(), 2))
    logits, phase_logits = net.forward_with_phase(x, mask)
    bce = F.binary_cross_entropy_with_logits(phase_logits, share, reduction="none")
    expected = (F.cross_entropy(logits[:, :18], targets) + 0.3 * F.cross_entropy(logits[:, 18:], orientation)
                + 0.7 * (bce * real).sum() / real.sum())
    batch = (x, mask, targets, orientation, share, real)
    torch.testing.assert_close(ti.training_loss(0.3, 0.7)(net, batch), expected)
    torch.testing.assert_close(ti.training_loss(0.0, 0.0)(net, batch), ti.gesture_loss(net, batch))
    torch.testing.assert_close(net(x, mask), logits)          # forward() = the same logits, phase aside


@pytest.mark.parametrize("weights", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5)])
def test_a_zero_weight_builds_no_head(weights):
    x, m, y = _tiny_arrays(20)
    data = ti.DeepFoldData(x, m, y, [f"c{i}" for i in range(5)],
                           ti.RecipeConfig(ORIENTATION_WEIGHT=weights[0], PHASE_WEIGHT=weights[1]), 0, y % 4, m)
    heads = ti.auxiliary_heads(data.recipe, data.orientation is not None, data.phase is not None)
    assert heads == {"orientations": 4 if weights[0] else 0, "phase_head": bool(weights[1])}
    net = ti.build_time_series_net(5, pools=2, hidden=8, **heads)
    assert (net.orientation is not None) == bool(weights[0]) and (net.phase is not None) == bool(weights[1])
    assert net(torch.from_numpy(x[:3]), torch.from_numpy(m[:3])).shape == (3, 18 + heads["orientations"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fully_masked_rows_stay_finite_in_half_precision(dtype):
    net = ti.build_time_series_net(6, pools=3, hidden=8).eval().to(dtype)
    x = torch.randn(3, 90, 6, dtype=dtype)
    mask = torch.ones(3, 90, dtype=dtype)
    mask[1] = 0                                             # a row with no real frame at all
    with torch.inference_mode():
        out = net(x, mask)
    assert torch.isfinite(out).all()
    # Why the fill value matters: -1e9 does not exist in fp16 (it becomes -inf), and softmax over a row
    # of -inf is NaN; -65504 is fp16's lowest finite value.
    assert torch.tensor(-1e9, dtype=torch.float16).isinf()
    assert torch.softmax(torch.full((4,), float("-inf"), dtype=torch.float16), 0).isnan().all()
    assert torch.isfinite(torch.softmax(torch.full((4,), ti.ATTENTION_FILL, dtype=torch.float16), 0)).all()


def test_stacked_fold_nets_equal_the_mean_of_the_nets():
    torch.manual_seed(0)
    nets = []
    for _ in range(3):
        net = ti.build_time_series_net(7, pools=3, hidden=16)
        for module in net.modules():                        # non-trivial BatchNorm statistics
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.normal_()
        nets.append(net.eval())
    stack = ti.StackedNets(nets)
    x = torch.randn(3, 4, 90, 7)                            # each net gets its own (standardised) input
    mask = torch.ones(4, 90)
    mask[1, 30:] = 0
    mask[2] = 0                                             # fully padded
    with torch.inference_mode():
        expected = torch.stack([torch.softmax(net(x[k], mask), 1) for k, net in enumerate(nets)]).mean(0)
        got = stack(x, mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_early_stopper_semantics():
    stopper = ti.EarlyStopper(patience=2, min_delta=0.01)
    assert stopper.step(0.50) is False and stopper.best == 0.50
    assert stopper.step(0.505) is False                     # not better by more than min_delta
    assert stopper.step(0.52) is False and stopper.best == 0.52 and stopper.bad == 0
    assert stopper.step(0.52) is False
    assert stopper.step(0.40) is True                       # two epochs without improvement
    assert stopper.best_epoch == 2


def _gradients(net, batches, group_size):
    net.zero_grad()
    ti.accumulate_gradients(net, batches, group_size, ti.TorchRuntime(torch.device("cpu"), None))
    return [p.grad.clone() for p in net.parameters()]


def test_accumulation_in_training_mode_weights_each_micro_batch_by_its_share():
    """In training mode, where accumulation runs, the summed gradient is each micro-batch's own mean-loss gradient
    weighted by its share of the step's rows (an uneven last micro-batch counts for its rows, not for a whole
    micro-batch). It is not the big batch's gradient: BatchNorm normalises each micro-batch with that
    micro-batch's statistics, as with any accumulation. With BatchNorm's statistics fixed (eval) it is."""
    torch.manual_seed(0)
    net = ti.build_time_series_net(4, pools=3, hidden=8, dropout=0.0).train()     # no dropout: repeatable
    x, mask = torch.randn(32, 40, 4), torch.ones(32, 40)
    mask[5, 30:] = 0
    y = torch.randint(0, 18, (32,))
    parts = [(x[:20], mask[:20], y[:20]), (x[20:], mask[20:], y[20:])]
    alone = [_gradients(net, [part], len(part[2])) for part in parts]          # each micro-batch's own gradient
    accumulated = _gradients(net, parts, 32)
    for acc, first, second in zip(accumulated, *alone):
        torch.testing.assert_close(acc, first * 20 / 32 + second * 12 / 32, atol=1e-6, rtol=1e-5)
    big = _gradients(net, [(x, mask, y)], 32)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(accumulated, big))   # BatchNorm's statistics
    net.eval()
    big = _gradients(net, [(x, mask, y)], 32)
    for micro in (parts, [(x[i:i + 8], mask[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]):
        for a, b in zip(big, _gradients(net, micro, 32)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _tiny_arrays(n=96, pad=40, features=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 18, n)
    x = (rng.normal(0, 1, (n, pad, features)) + y[:, None, None] * 0.1).astype(np.float32)
    return x, np.ones((n, pad), np.float32), y


def _fold_args(n_train=300, n_valid=40, seed=0):
    """(DeepFoldData, x_valid, mask_valid, y_valid, score_mask) of random data with a weak class signal."""
    x, m, y = _tiny_arrays(n_train + n_valid, seed=seed)
    data = ti.DeepFoldData(x[:n_train], m[:n_train], y[:n_train], [f"c{i}" for i in range(x.shape[2])],
                           ti.RecipeConfig(), 0)
    return (data, x[n_train:], m[n_train:], y[n_train:], np.ones(n_valid, bool))


def _cpu_config():
    return ti.resolve_device_defaults(ti.DLConfig(), gpu=False, prefix="DL")


def _watch(n=60, seed=5):
    x, m, y = _tiny_arrays(n, seed=seed)
    return ti.WatchSet(x, m, y, np.ones(n, bool))


def _train_with_hook(hook):
    """One fold, one epoch, through the OOM fallback, with ``hook`` called before every micro-batch."""
    dl_cfg = _cpu_config()
    return ti.train_torch_fold_with_fallback(*_fold_args(), dl_cfg=dl_cfg,
                                             runtime=ti.TorchRuntime(torch.device("cpu"), None), seed=0, label="test",
                                             oom_hook=hook)


def test_injected_oom_restarts_the_fold_with_half_the_micro_batch(warnings_seen, monkeypatch):
    monkeypatch.setenv("DL_BATCH_SIZE", "256")
    monkeypatch.setenv("DL_EPOCHS", "1")
    seen = []

    def oom_above_64(size):
        seen.append(size)
        if size > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    result = _train_with_hook(oom_above_64)
    assert (result["micro_batch"], result["accum_steps"]) == (64, 4)        # effective batch still 256
    assert "out of memory at micro-batch 256" in warnings_seen.text
    assert "out of memory at micro-batch 128" in warnings_seen.text
    assert "micro-batch 64 x 4 accumulation step(s) = effective batch 256" in warnings_seen.text
    assert max(seen[-2:]) <= 64


def test_oom_below_the_floor_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DL_BATCH_SIZE", "128")
    monkeypatch.setenv("DL_EPOCHS", "1")

    def always_oom(size):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory at micro-batch 64 .*smallest the fallback goes to"):
        _train_with_hook(always_oom)


def test_other_errors_are_not_mistaken_for_oom(monkeypatch):
    monkeypatch.setenv("DL_EPOCHS", "1")

    def broken(size):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        _train_with_hook(broken)


def test_early_stopping_on_the_watch_set_ends_training_and_keeps_its_best_epoch(monkeypatch, warnings_seen):
    monkeypatch.setenv("DL_EPOCHS", "30")
    monkeypatch.setenv("TORCH_ES_PATIENCE", "2")
    monkeypatch.setenv("TORCH_ES_MIN_DELTA", "0.5")         # nothing improves by 0.5: stop after 1 + 2 epochs
    result = ti.train_torch_fold(*_fold_args(), dl_cfg=_cpu_config(), runtime=ti.TorchRuntime(torch.device("cpu"), None),
                                 seed=0, label="t", micro_batch=32, accum_steps=1, watch=_watch())
    assert result["epochs_run"] == 3 and result["stopped_early"] and result["epoch"] == 1
    assert "early stopping at epoch 3" in warnings_seen.text


@pytest.mark.parametrize("inner", [False, True])
def test_the_kept_epoch_never_reads_the_out_of_fold_rows(monkeypatch, inner):
    """Train the same fold twice with different out-of-fold rows (inputs and labels): the kept epoch and
    weights are identical, so nothing about those rows chose them. Only their logged scores differ."""
    monkeypatch.setenv("DL_EPOCHS", "4")
    monkeypatch.setenv("TORCH_ES_PATIENCE", "1")
    runtime = ti.TorchRuntime(torch.device("cpu"), None)
    runs = []
    for valid_seed in (1, 2):
        data, *_ = _fold_args()
        _, x_va, m_va, y_va, score_mask = _fold_args(seed=valid_seed)
        runs.append(ti.train_torch_fold(data, x_va, m_va, y_va, score_mask, dl_cfg=_cpu_config(), runtime=runtime,
                                        seed=0, label="t", micro_batch=32, accum_steps=1,
                                        watch=_watch() if inner else None))
    assert runs[0]["epoch"] == runs[1]["epoch"] == (runs[0]["epoch"] if inner else 4)
    assert runs[0]["epochs_run"] == runs[1]["epochs_run"]
    for name, value in runs[0]["state"].items():
        assert torch.equal(value, runs[1]["state"][name]), name
    assert [h["score"] for h in runs[0]["history"]] != [h["score"] for h in runs[1]["history"]]


def test_one_cycle_schedule_warms_up_then_anneals_to_nearly_zero_at_the_last_step():
    peak, total = 2e-3, 200
    lrs = [ti.one_cycle_lr(step, total, peak) for step in range(total)]
    assert lrs[0] == pytest.approx(peak / 25) and max(lrs) == pytest.approx(peak)
    assert int(np.argmax(lrs)) == 30 and lrs[-1] < peak * 1e-3
    assert all(a >= b for a, b in zip(lrs[30:], lrs[31:]))


def test_pad_length_fixed_or_percentile(monkeypatch):
    lengths = np.arange(29, 229)
    assert ti.torch_pad_length(lengths, ti.DLConfig()) == 90
    monkeypatch.setenv("DL_FIXED_PAD_LEN", "0")
    assert ti.torch_pad_length(lengths, ti.DLConfig()) == int(np.ceil(np.percentile(lengths, 95)))


def test_two_folds_train_save_and_predict(all_families_run, tiny_data):
    out, result = all_families_run
    assert sorted(p.name for p in (out / "models").glob("torch_*.pt")) == sorted(
        f"torch_{v}_fold{k}.pt" for v in ("imu", "full") for k in range(2))
    assert (out / "frame_features" / ti.FRAME_STORE_MANIFEST).is_file()
    manifest = json.loads((out / "artifacts.json").read_text())
    assert set(manifest["families"]) == {"lgbm", "torch", "keras"}
    routes = {(r["family"], r["route"]) for r in result["summary"]}
    assert {("torch", "imu"), ("torch", "full")} <= routes
    folds = [r for r in result["folds"] if r["family"] == "torch"]
    assert all(r["effective_batch"] == 32 and r["epochs_run"] == 3 for r in folds)
    epochs = pl.read_csv(out / "epoch_log.csv").filter(pl.col("family") == "torch")
    assert epochs.height == 2 * 2 * 3 and {"fold", "epoch", "loss", "score", "watch_score", "lr",
                                           "seconds"} <= set(epochs.columns)
    fold_csv = pl.read_csv(out / "fold_metrics.csv")
    assert {"micro_batch", "effective_batch", "early_stopped"} <= set(fold_csv.columns)
    assert result["inference"]["warnings"].get("fallback", 0) == 0


def test_torch_checkpoint_loads_safely_and_reproduces_oof(all_families_run):
    """A saved fold model, loaded with weights_only, gives the out-of-fold probabilities training recorded for its
    fold's sequences (from the store's frames; tests/test_parity.py starts from the raw rows)."""
    out, _ = all_families_run
    ck = torch.load(out / "models" / "torch_full_fold0.pt", map_location="cpu", weights_only=True)
    assert ck["pad_len"] == 90 and ck["pools"] == 3 and ck["classes"] == list(ti.GESTURES)
    assert ck["channels"] == ti.FULL_CHANNELS and ck["selection"] == "fixed"
    family = ti.TorchFamily.load([out / "models" / "torch_full_fold0.pt"], [], ti.FULL_CHANNELS)
    oof = pl.read_parquet(out / "oof_predictions.parquet")
    store = ti.FrameFeatureStore(out / "frame_features")
    fold0 = oof.filter((pl.col("fold") == 0) & pl.col("has_thm_tof")).head(8)
    for row in fold0.iter_rows(named=True):
        probs = family.predict(ti.SequenceInputs(store.read(row["sequence_id"]), {}))
        expected = np.array([row[f"torch_full__{g}"] for g in ti.GESTURES])
        np.testing.assert_allclose(probs, expected, atol=1e-4)


def test_bad_input_with_torch_models_loaded(all_families_run, tiny_data, tmp_path, warnings_seen):
    from test_predict import BAD_INPUTS, _one
    out = all_families_run[0]
    saved = json.loads((out / ti.ARTIFACT_MANIFEST).read_text())["families"]
    ti.configure_inference(models_of(out, tmp_path / "torch", {"torch": saved["torch"]}))   # Torch answers alone
    for case, (make, _) in BAD_INPUTS.items():
        sequence, demo = make(*_one(tiny_data))
        assert ti.predict(sequence, demo) in ti.GESTURES, case
    counts = ti._PREDICTOR_STATE["warnings"].counts
    assert counts.get("fallback", 0) == 1                   # only the empty sequence fell back
    assert ti.answer_counts()["by_family"] == {"torch/full": 11, "torch/imu": 1}    # only Torch answered
    ti.configure_inference(None)


def test_torch_family_stacked_prediction_equals_the_per_fold_loop(all_families_run):
    out, _ = all_families_run
    paths = sorted((out / "models").glob("torch_full_fold*.pt"))
    family = ti.TorchFamily.load(paths, [], ti.FULL_CHANNELS)
    assert family.stack is not None and len(family.models) == 2
    frames = np.random.default_rng(0).standard_normal((120, len(ti.FRAME_FEATURES))).astype(np.float32)
    inputs = ti.SequenceInputs(frames, {})
    stacked = family.predict(inputs)
    family.stack = None                                     # the plain loop over fold nets
    np.testing.assert_allclose(stacked, family.predict(inputs), atol=1e-6)


# ── Precision from the device's compute capability: Kaggle's P100 and T4 have no bf16 hardware ─────────────
GPUS = {  # name, compute capability, torch.cuda.is_bf16_supported(including_emulation=False)
    "P100": ("Tesla P100-PCIE-16GB", (6, 0), False), "T4": ("Tesla T4", (7, 5), False),
    "A100": ("NVIDIA A100-SXM4-40GB", (8, 0), True), "H100": ("NVIDIA H100 80GB HBM3", (9, 0), True)}


def _mock_gpu(monkeypatch, name, capability, bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    # Torch's default (including_emulation=True) says yes on every GPU from compute 6.0: the trap this avoids.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or bf16)


@pytest.mark.parametrize("gpu,amp,scaler,keras_mixed,words", [
    ("P100", None, False, False, "Tesla P100-PCIE-16GB, compute 6.0: float32"),
    ("T4", torch.float16, True, True, "Tesla T4, compute 7.5: fp16 autocast + GradScaler"),
    ("A100", torch.bfloat16, False, True, "NVIDIA A100-SXM4-40GB, compute 8.0: bf16 autocast"),
    ("H100", torch.bfloat16, False, True, "NVIDIA H100 80GB HBM3, compute 9.0: bf16 autocast")])
def test_precision_is_decided_by_compute_capability(gpu, amp, scaler, keras_mixed, words, monkeypatch):
    _mock_gpu(monkeypatch, *GPUS[gpu])
    runtime = ti.torch_runtime()
    assert runtime.device.type == "cuda" and runtime.amp_dtype == amp and runtime.use_scaler == scaler
    assert runtime.words.startswith(words)
    assert ti.decide_precision(*GPUS[gpu]).keras_mixed == keras_mixed
    name, capability, bf16 = GPUS[gpu]
    assert ti.torch_gpu() == (name, capability, bf16)        # hardware bf16, not Torch's emulating default
    # Even told "bf16" (as the emulating default says from compute 6.0), a GPU below 8.0 does not train in it.
    assert ti.decide_precision(name, capability, True).torch_amp == (str(amp).replace("torch.", "") if amp else None)


def test_precision_on_the_cpu_is_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime = ti.torch_runtime()
    assert runtime.device.type == "cpu" and runtime.amp_dtype is None and not runtime.use_scaler
    assert runtime.words.startswith("CPU: float32") and not ti.decide_precision(None, None).keras_mixed
