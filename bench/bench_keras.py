"""Keras against Torch: seconds per epoch on the same data and batch, Keras precision, predict latency by call style.

    python bench/bench_keras.py                    # full synthetic set, fold 0, full-sensor variant
    python bench/bench_keras.py --subjects 20      # quicker
    KERAS_BACKEND=torch python bench/bench_keras.py   # the same on another backend

Epochs: the training path each family really uses (train_torch_fold; KerasFoldTrainer.fit_fold, a
train_on_batch loop), on fold 0's training sequences of the chosen subjects, batch KERAS_BATCH_SIZE for both,
validation on 64 sequences only (both families score the validation fold every epoch; a small one keeps
the figure about training). 1 + --epochs epochs: the first (Keras traces its steps there) is reported
apart, the mean of the rest is the steady state. Then the same Keras epochs under mixed precision.
Latency: one sequence (batch of one), --calls calls after two warm-up calls, p50 / p95, for an eager
model(x) call, model.predict(), predict_on_batch() of one model, and predict_on_batch() of the 5-fold
averaging model that predict() uses.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from common import full_synthetic_dir, ti


def keras_epochs(data, xv, mv, yv, mixed: bool, epochs: int, keras_cfg, runtime) -> tuple[float, float, float]:
    """(first epoch s, mean s of the later epochs, final loss) of one fold through KerasFoldTrainer."""
    runtime = dataclasses.replace(runtime, mixed_precision=mixed)
    with ti.keras_precision(mixed):
        trainer = ti.KerasFoldTrainer(data.x.shape[2], data.x.shape[1], keras_cfg, runtime, "bench")
        result = trainer.fit_fold(data, xv, mv, yv, np.ones(len(yv), bool), 1 + epochs, 0, "keras bench",
                                  "keras_bench", Path(tempfile.mkdtemp()) / "keras_bench.keras")
    seconds = [h["seconds"] for h in result["history"]]
    loss = result["history"][-1]["loss"]
    if not np.isfinite(loss):
        raise SystemExit(f"NaN loss under {'mixed' if mixed else 'float32'} precision")
    return seconds[0], float(np.mean(seconds[1:])), loss


def torch_epochs(data, xv, mv, yv, epochs: int, batch: int) -> tuple[float, float, float]:
    """The same for train_torch_fold, on the same DeepFoldData (the same augmented epochs), the same network
    size as Keras's (both follow the device's defaults unless DL_* / KERAS_* say otherwise)."""
    runtime = ti.torch_runtime()
    dl_cfg = ti.resolve_device_defaults(ti.DLConfig(), runtime.device.type == "cuda", "DL")
    dl_cfg = dataclasses.replace(dl_cfg, EPOCHS=1 + epochs, BATCH_SIZE=batch)
    result = ti.train_torch_fold(data, xv, mv, yv, np.ones(len(yv), bool), dl_cfg, runtime, 0,
                                 "torch bench", batch, 1)
    seconds = [h["seconds"] for h in result["history"]]
    return seconds[0], float(np.mean(seconds[1:])), result["history"][-1]["loss"]


def latency_ms(call, calls: int) -> tuple[float, float]:
    import time
    call(), call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 95) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="competition-format data (default: the full synthetic set)")
    parser.add_argument("--subjects", type=int, default=81, help="train subjects to use (all of the full set: 81)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the first, per row")
    parser.add_argument("--calls", type=int, default=50, help="timed predict calls per call style")
    parser.add_argument("--skip-mixed", action="store_true", help="float32 only (mixed precision is slow on CPU)")
    args = parser.parse_args()
    ti.setup_logging(None)
    runtime = ti.keras_runtime(ti.KerasSpeedConfig())    # imports Keras quietly, before anything else does
    import keras
    train = ti.load_train_data(args.data_dir or full_synthetic_dir())
    subjects = sorted(train["subject"].unique().to_list())[: args.subjects]
    train = train.filter(pl.col("subject").is_in(subjects))
    sequences = ti.sequence_table(train)
    folds = ti.make_folds(sequences, 5, 42)
    frames = ti.SequenceFrames.from_table(train, True)
    inputs = ti.DeepInputs(ti.frame_cache_for_run(frames, None, ti.FrameCacheConfig()), frames.ids, frames.lengths)
    keras_cfg = ti.KerasConfig()
    train_idx, valid_idx = np.where(folds != 0)[0], np.where(folds == 0)[0][:64]
    x, mask = inputs.take("full", keras_cfg.FIXED_PAD_LEN, train_idx)
    xv, mv = inputs.take("full", keras_cfg.FIXED_PAD_LEN, valid_idx)
    y, yv = sequences["label"].to_numpy()[train_idx], sequences["label"].to_numpy()[valid_idx]
    keras_cfg = ti.resolve_device_defaults(keras_cfg, runtime.gpu, "KERAS")
    batch = keras_cfg.BATCH_SIZE
    data = ti.DeepFoldData(x, mask, y, ti.deep_channels("full"), ti.RecipeConfig(), 0)

    torch_first, torch_epoch, torch_loss = torch_epochs(data, xv, mv, yv, args.epochs, batch)
    rows = [("Torch, float32 (train_torch_fold)", torch_first, torch_epoch, torch_loss)]
    rows.append(("Keras, float32 (KerasFoldTrainer, train_on_batch)",
                 *keras_epochs(data, xv, mv, yv, False, args.epochs, keras_cfg, runtime)))
    if not args.skip_mixed:
        rows.append(("Keras, mixed_float16", *keras_epochs(data, xv, mv, yv, True, args.epochs, keras_cfg, runtime)))

    keras.backend.clear_session()
    models = [ti.keras_inference_model(ti.build_keras_model(x.shape[2], x.shape[1], 3, name=f"keras_net{k}"),
                                       data.mean, data.std, f"keras_full_fold{k}") for k in range(5)]
    one = [x[:1], mask[:1]]
    combined = ti.KerasFamily(models, ti.deep_channels("full")).model
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
    print("| family, precision | first epoch s | s / epoch after it | vs Torch | final loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, first, epoch, loss in rows:
        print(f"| {name} | {first:.2f} | {epoch:.2f} | {epoch / torch_epoch:.2f}x | {loss:.3f} |")
    print("\n| call style (batch of 1) | p50 ms | p95 ms |\n| --- | --- | --- |")
    for name, p50, p95 in latencies:
        print(f"| {name} | {p50:.1f} | {p95:.1f} |")


if __name__ == "__main__":
    main()
