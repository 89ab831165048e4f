"""Torch TimeSeriesNet: the design notes' new configuration against the old one, same data, same run.

    python bench/bench_torch.py                              # full synthetic set, 5 folds, full-sensor variant
    python bench/bench_torch.py --subjects 40 --folds 0      # a quicker, partial comparison (say so when quoting)

new: pad 90, 3 pooling stages, batch 512, early stopping (TORCH_ES_PATIENCE) -- the notes' sections 1-1, 1-3,
     2-1, 2-2;
old: 95th-percentile pad, 2 pooling stages, batch 64, no early stopping (all DL_EPOCHS epochs).
Prints seconds per epoch and per fold and the out-of-fold score of each, as a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from common import CACHE, full_synthetic_dir, ti

CONFIGS = {
    "new (pad 90, 3 pools, batch 512, early stopping)": {"DL_FIXED_PAD_LEN": "90", "DL_POOLS": "3",
                                                          "DL_BATCH_SIZE": "512"},
    "old (p95 pad, 2 pools, batch 64, no early stopping)": {"DL_FIXED_PAD_LEN": "0", "DL_POOLS": "2",
                                                             "DL_BATCH_SIZE": "64", "TORCH_ES_PATIENCE": "100000"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=81, help="train subjects of the full set to use (all: 81)")
    parser.add_argument("--folds", type=int, nargs="*", help="fold indices to run (default: all 5)")
    parser.add_argument("--variant", default="full", choices=ti.VARIANTS)
    parser.add_argument("--only", choices=("new", "old"), help="run one configuration (to try settings quickly)")
    args = parser.parse_args()
    ti.setup_logging(None)
    cache_dir = CACHE
    data_dir = full_synthetic_dir()
    train = ti.load_train_data(data_dir)
    subjects = sorted(train["subject"].unique().to_list())[: args.subjects]
    train = train.filter(pl.col("subject").is_in(subjects))
    sequences = ti.sequence_table(train)
    lengths = train.group_by("sequence_id", maintain_order=True).len()["len"].to_numpy()
    settings = ti.Settings.from_env()
    folds = ti.make_folds(sequences, settings.cfg.N_FOLDS, settings.cfg.SEED)
    store = ti.FrameFeatureStore(cache_dir / "frame_features_full")
    ti.build_frame_feature_store(train, store, workers=2)
    cache = ti.FrameFeatureCache(store, max_items=sequences.height + 1, max_bytes=8 * 2**30)
    cache.preload(sequences["sequence_id"].to_list())
    runtime = ti.torch_runtime()
    rows = []
    for name, env in CONFIGS.items():
        if args.only and not name.startswith(args.only):
            continue
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            dl_cfg = ti.DLConfig()
            # Both configurations get the GPU epoch budget (40) unless DL_EPOCHS says otherwise: the CPU
            # budget of the default run would hide what early stopping saves.
            dl_cfg.EPOCHS = dl_cfg.EPOCHS or ti.GPU_EPOCHS
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        started = time.perf_counter()
        result = ti.train_torch(cache, sequences, lengths, folds, args.variant, dl_cfg, settings.cfg.SEED,
                                Path(tempfile.mkdtemp(prefix="bench_torch_")), runtime, only_folds=args.folds)
        seconds = time.perf_counter() - started
        per_fold = [m["seconds"] for m in result.fold_metrics]
        per_epoch = [m["seconds_per_epoch"] for m in result.fold_metrics]
        epochs = [m["epochs_run"] for m in result.fold_metrics]
        rows.append((name, ti.torch_pad_length(lengths, dl_cfg), np.mean(per_epoch), np.mean(per_fold),
                     f"{np.mean(epochs):.1f}", result.overall, seconds))
    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} CPU cores, device {runtime.describe()}, "
          f"Python {platform.python_version()}; {len(subjects)} subjects, {sequences.height:,} sequences, "
          f"variant {args.variant}, folds {args.folds if args.folds is not None else 'all'}\n")
    print("| configuration | pad | s / epoch | s / fold | epochs run | OOF score (BinF1 / MacroF1) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, pad, epoch_s, fold_s, epochs, score, _ in rows:
        print(f"| {name} | {pad} | {epoch_s:.2f} | {fold_s:.1f} | {epochs} | {score.score:.4f} "
              f"({score.binary_f1:.4f} / {score.macro_f1:.4f}) |")
    if len(rows) < 2:
        return
    speedup = rows[1][3] / rows[0][3]
    print(f"\nTraining time per fold, old / new: {speedup:.1f}x; OOF score new - old: "
          f"{rows[0][5].score - rows[1][5].score:+.4f}")


if __name__ == "__main__":
    main()
