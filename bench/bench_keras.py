"""Keras model: seconds per epoch in float32 vs mixed precision, and per-call predict latency by call style.

    python bench/bench_keras.py                    # full synthetic set, fold 0, full-sensor variant
    python bench/bench_keras.py --subjects 20      # quicker
    KERAS_BACKEND=torch python bench/bench_keras.py   # the same on another backend

Epochs: one warm-up epoch (it holds the traces of the training step), then --epochs timed epochs of
model.fit on fold 0's training sequences, per precision, in one run. Latency: one sequence (batch of one),
--calls calls after two warm-up calls, p50 / p95, for an eager model(x) call, model.predict(),
predict_on_batch() of one model, and predict_on_batch() of the 5-fold averaging model that predict() uses.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import polars as pl

from common import CACHE, full_synthetic_dir, ti


def epoch_seconds(x, mask, y, mixed: bool, epochs: int, batch_size: int) -> tuple[float, float]:
    """(mean seconds of the timed epochs, final loss) for a fresh model under the given precision."""
    import keras
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    with ti.keras_precision(mixed):
        mean, std = ti.frame_statistics(x, mask)
        model = ti.build_keras_model(x.shape[2], x.shape[1], 3, mean, std)
        model.compile(optimizer=keras.optimizers.AdamW(2e-3), loss="sparse_categorical_crossentropy")
        model.fit([x, mask], y, batch_size=batch_size, epochs=1, verbose=0)            # traces
        started = time.perf_counter()
        history = model.fit([x, mask], y, batch_size=batch_size, epochs=epochs, verbose=0)
        seconds = (time.perf_counter() - started) / epochs
    loss = history.history["loss"][-1]
    if not np.isfinite(loss):
        raise SystemExit(f"NaN loss under {'mixed' if mixed else 'float32'} precision")
    return seconds, loss


def latency_ms(call, calls: int) -> tuple[float, float]:
    call(), call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 95) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=81, help="train subjects of the full set to use (all: 81)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per precision")
    parser.add_argument("--calls", type=int, default=50, help="timed predict calls per call style")
    parser.add_argument("--skip-mixed", action="store_true", help="float32 only (mixed precision is slow on CPU)")
    args = parser.parse_args()
    import keras
    ti.setup_logging(None)
    runtime = ti.keras_runtime(ti.KerasSpeedConfig())
    train = ti.load_train_data(full_synthetic_dir())
    subjects = sorted(train["subject"].unique().to_list())[: args.subjects]
    train = train.filter(pl.col("subject").is_in(subjects))
    sequences = ti.sequence_table(train)
    folds = ti.make_folds(sequences, 5, 42)
    store = ti.FrameFeatureStore(CACHE / "frame_features_full")
    ti.build_frame_feature_store(train, store, workers=2)
    cache = ti.FrameFeatureCache(store, max_items=sequences.height + 1, max_bytes=8 * 2**30)
    ids = [sid for sid, f in zip(sequences["sequence_id"].to_list(), folds) if f != 0]
    x, mask = ti.padded_frames(cache, ids, ti.KerasConfig().FIXED_PAD_LEN)
    y = sequences["label"].to_numpy()[folds != 0]
    batch = ti.KerasConfig().BATCH_SIZE

    rows = []
    f32, loss32 = epoch_seconds(x, mask, y, False, args.epochs, batch)
    rows.append(("float32", f"{f32:.2f}", "1.00x", f"{loss32:.3f}"))
    if not args.skip_mixed:
        mp, loss_mp = epoch_seconds(x, mask, y, True, args.epochs, batch)
        rows.append(("mixed_float16", f"{mp:.2f}", f"{f32 / mp:.2f}x", f"{loss_mp:.3f}"))

    keras.backend.clear_session()
    mean, std = ti.frame_statistics(x, mask)
    models = [ti.build_keras_model(x.shape[2], x.shape[1], 3, mean, std, name=f"keras_full_fold{k}") for k in range(5)]
    one = [x[:1], mask[:1]]
    combined = ti.KerasFamily(models, list(ti.FRAME_FEATURES)).model
    styles = {
        "eager call `model(x, training=False)`, 1 model": lambda: models[0](one, training=False),
        "`model.predict(x)`, 1 model": lambda: models[0].predict(one, verbose=0),
        "`predict_on_batch(x)`, 1 model": lambda: models[0].predict_on_batch(one),
        "`predict_on_batch(x)`, 5-fold averaging model (what predict() uses)": lambda: combined.predict_on_batch(one),
    }
    latencies = [(name, *latency_ms(call, args.calls)) for name, call in styles.items()]

    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"keras {keras.__version__}, {runtime.backend} backend, {'GPU' if runtime.gpu else 'CPU'}; "
          f"{len(subjects)} subjects, fold 0: {len(y):,} training sequences, pad {x.shape[1]}, batch {batch}\n")
    print("| precision | s / epoch | speed vs float32 | final loss |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n| call style (batch of 1) | p50 ms | p95 ms |\n| --- | --- | --- |")
    for name, p50, p95 in latencies:
        print(f"| {name} | {p50:.1f} | {p95:.1f} |")


if __name__ == "__main__":
    main()
