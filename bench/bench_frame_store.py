"""Frame-feature store and LRU cache on the `full` synthetic set (81 subjects, ~8,150 sequences).

    python bench/bench_frame_store.py

Rows: cold build of the Parquet store; the warm re-check that skips valid files; warm load of every
sequence into the cache; one epoch of frame access through the warm cache against recomputing every
sequence's frames (the design notes' original cost); memory hit rate per epoch with a cache large enough
for the data and with the default FRAME_CACHE_MAX_ITEMS. Prints a Markdown table for the README.
"""
from __future__ import annotations

import shutil

import polars as pl

from common import CACHE, full_synthetic_dir, print_stage_table, ti, timed


def main() -> None:
    ti.setup_logging(None)
    cache_dir = CACHE
    data_dir = full_synthetic_dir()
    train = ti.load_train_data(data_dir)
    ids = train["sequence_id"].unique(maintain_order=True).to_list()
    rows = []

    store_dir = cache_dir / "frame_features_full"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = ti.FrameFeatureStore(store_dir)
    stats, seconds = timed(ti.build_frame_feature_store, train, store, 2)
    size_mb = sum(p.stat().st_size for p in store_dir.glob("*.parquet")) / 2**20
    rows.append(("**cold store build** (frames for the whole table + one Parquet file per sequence; target < 60 s)",
                 f"**{seconds:.1f} s**", f"{stats['written']:,} files, {size_mb:.0f} MB"))
    stats, seconds = timed(ti.build_frame_feature_store, train, store, 2)
    rows.append(("warm store check (every file's footer validated, nothing rebuilt)", f"{seconds:.1f} s",
                 f"{stats['skipped']:,} skipped"))

    big = ti.FrameFeatureCache(store, max_items=len(ids) + 1, max_bytes=8 * 2**30)
    _, seconds = timed(big.preload, ids, 2)
    rows.append(("**warm load of every sequence into the cache** (2 reader threads; target < 15 s)",
                 f"**{seconds:.1f} s**", f"{len(big):,} sequences, {big.bytes / 2**20:.0f} MB in memory"))
    big.take_counts()

    def epoch_through_cache(cache):
        for sid in ids:
            cache.get(sid)

    _, cached_epoch = timed(epoch_through_cache, big)
    counts = big.take_counts()
    raw_by_id = {key[0]: part for key, part in train.partition_by("sequence_id", as_dict=True).items()}

    def epoch_recomputed():
        for sid in ids:
            ti.clean_frame_array(ti.build_frame_features(raw_by_id[sid]).select(ti.FRAME_FEATURES).to_numpy())

    _, recomputed_epoch = timed(epoch_recomputed)
    rows.append(("one epoch of frame access, recomputing every sequence (the notes' original cost)",
                 f"{recomputed_epoch:.1f} s", f"{len(ids):,} sequences"))
    rows.append(("one epoch of frame access through the warm cache", f"{cached_epoch * 1000:.0f} ms",
                 f"hit rate {100 * counts['hit_rate']:.1f}%"))
    rows.append(("**speed-up, cache vs recompute** (target >= 20x)", f"**{recomputed_epoch / cached_epoch:,.0f}x**",
                 "same sequences, same run"))
    (x, _), seconds = timed(ti.padded_frames, big, ids, 90)
    rows.append(("padded arrays for every sequence (pad 90, last frames kept), warm cache", f"{seconds:.2f} s",
                 f"{x.nbytes / 2**20:.0f} MB float32"))

    for label, items in (("large enough", len(ids) + 1), ("default FRAME_CACHE_MAX_ITEMS", ti.FrameCacheConfig().MAX_ITEMS)):
        cache = ti.FrameFeatureCache(store, max_items=items, max_bytes=ti.FrameCacheConfig().MAX_BYTES)
        cache.warn_if_too_small(len(ids), big.bytes / len(ids))
        rates = []
        for _ in range(3):
            epoch_through_cache(cache)
            rates.append(100 * cache.take_counts()["hit_rate"])
        rows.append((f"hit rate per epoch, cache {label} ({items:,} items)", "",
                     " / ".join(f"epoch {i + 1}: {r:.1f}%" for i, r in enumerate(rates))))

    print_stage_table(rows, f"polars {pl.__version__}")


if __name__ == "__main__":
    main()
