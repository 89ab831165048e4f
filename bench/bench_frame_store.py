"""Frame features, store, cache and the deep models' arrays on the `full` synthetic set (81 subjects, ~8,150
sequences).

    python bench/bench_frame_store.py

Rows: the run's one frame pass over the whole table; a cold build of the Parquet store from that pass; the
warm re-check that skips valid files; the cache primed from the pass; the deep models' arrays for both
routes, built once through it; every fold's slices of them as a default run takes them (2 deep families x
2 routes x 5 folds); for comparison, one epoch of frame access recomputing every sequence (the design
notes' original cost) and reading every sequence from the store; and the hit rate of an LRU scanned in the
same order every epoch, sized from the data (the default) and at the notes' former 1,600 items. Prints a
Markdown table for the README.
"""
from __future__ import annotations

import shutil

import numpy as np
import polars as pl

from common import CACHE, full_synthetic_dir, print_stage_table, ti, timed


def main() -> None:
    ti.setup_logging(None)
    train = ti.load_train_data(full_synthetic_dir())
    sequences = ti.sequence_table(train)
    folds = ti.make_folds(sequences, 5, 42)
    rows = []

    frames, seconds = timed(ti.SequenceFrames.from_table, train, True)
    rows.append(("**one frame pass over the whole table** (feeds the store, the aggregates and the cache)",
                 f"**{seconds:.1f} s**", f"{len(frames.ids):,} sequences, {frames.values.nbytes / 2**20:.0f} MB"))
    fingerprint, seconds = timed(ti.table_fingerprint, train, True)
    rows.append(("the data fingerprint the store records, alone (raw matrix + SHA-256; the pass adds only the hash)", f"{seconds:.2f} s",
                 fingerprint))
    store_dir = CACHE / "frame_features_full"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = ti.FrameFeatureStore(store_dir)
    stats, seconds = timed(ti.build_frame_feature_store, train, store, 2, frames)
    size_mb = sum(p.stat().st_size for p in store_dir.glob("*.parquet")) / 2**20
    rows.append(("cold store build from the pass (one Parquet file per sequence)", f"{seconds:.1f} s",
                 f"{stats['written']:,} files, {size_mb:.0f} MB"))
    stats, seconds = timed(ti.build_frame_feature_store, train, store, 2, frames)
    rows.append(("warm store check (every file's footer validated, nothing rebuilt)", f"{seconds:.1f} s",
                 f"{stats['skipped']:,} skipped"))

    cache, seconds = timed(ti.frame_cache_for_run, frames, store, ti.FrameCacheConfig())
    rows.append(("cache primed from the pass (FRAME_CACHE_MAX_ITEMS unset: sized from the data)", f"{seconds:.2f} s",
                 f"{len(cache):,} sequences, {cache.bytes / 2**20:.0f} MB, no copy"))
    inputs = ti.DeepInputs(cache, frames.ids, frames.lengths)
    for variant in ti.VARIANTS:
        (x, _), seconds = timed(inputs.arrays, variant, 90)
        rows.append((f"deep arrays, {variant} route, pad 90, built once", f"{seconds:.2f} s",
                     f"{x.nbytes / 2**20:.0f} MB float32"))

    def every_fold_slice():
        for _family in ("torch", "keras"):
            for variant in ti.VARIANTS:
                for fold in range(5):
                    inputs.take(variant, 90, np.where(folds != fold)[0])
                    inputs.take(variant, 90, np.where(folds == fold)[0])

    _, slices = timed(every_fold_slice)
    counts = cache.take_counts()
    rows.append(("**every deep fold's frames** (2 families x 2 routes x 5 folds: train and valid slices)",
                 f"**{slices:.2f} s**", f"lookups after the arrays were built: {counts['lookups']}"))

    raw_by_id = {key[0]: part for key, part in train.partition_by("sequence_id", as_dict=True).items()}

    def epoch_recomputed():
        for sid in frames.ids:
            ti.build_frame_features(raw_by_id[sid]).select(ti.FRAME_FEATURES).to_numpy()

    _, recomputed_epoch = timed(epoch_recomputed)
    rows.append(("one epoch of frame access, recomputing every sequence (the notes' original cost)",
                 f"{recomputed_epoch:.1f} s", f"{len(frames.ids):,} sequences"))
    cold = ti.FrameFeatureCache(store, len(frames.ids), 8 * 2**30)
    _, seconds = timed(cold.preload, frames.ids, 2)
    rows.append(("one epoch of frame access, reading every sequence from the store (2 threads)", f"{seconds:.1f} s",
                 f"{cold.take_counts()['store_reads']:,} reads"))

    for label, items in (("sized from the data (default)", len(frames.ids)), ("the notes' former 1,600 items", 1600)):
        lru = ti.FrameFeatureCache(store, max_items=items, max_bytes=ti.FrameCacheConfig().MAX_BYTES)
        rates = []
        for _ in range(3):
            for sid in frames.ids:
                lru.get(sid)
            rates.append(100 * lru.take_counts()["hit_rate"])
        rows.append((f"LRU hit rate per epoch, scanned in order, {label} ({items:,} items)", "",
                     " / ".join(f"epoch {i + 1}: {r:.1f}%" for i, r in enumerate(rates))))

    print_stage_table(rows, f"polars {pl.__version__}")


if __name__ == "__main__":
    main()
