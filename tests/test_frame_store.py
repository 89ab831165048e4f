"""Frame-feature Parquet store and LRU cache: served frames are always fresh, whole and bounded."""
import json
import shutil

import numpy as np
import polars as pl
import pytest

import train_infer as ti


@pytest.fixture(scope="module")
def train(tiny_data):
    return ti.load_train_data(tiny_data)


@pytest.fixture(scope="module")
def store_template(train, tmp_path_factory):
    store = ti.FrameFeatureStore(tmp_path_factory.mktemp("template") / "frame_features")
    return store, ti.build_frame_feature_store(train, store, workers=2)


@pytest.fixture
def built_store(store_template, tmp_path):
    """A private copy of the module's store (building one takes a second or two)."""
    template, stats = store_template
    shutil.copytree(template.folder, tmp_path / "frame_features")
    return ti.FrameFeatureStore(tmp_path / "frame_features"), stats


def _raw_source(train):
    parts = train.partition_by("sequence_id", as_dict=True)
    return lambda sid: parts[(sid,)]


def _fresh(train, sid):
    frames = ti.build_frame_features(train.filter(pl.col("sequence_id") == sid))
    return ti.frame_array(frames.select(ti.FRAME_FEATURES).to_numpy())


def test_store_frames_equal_frames_computed_fresh(train, built_store):
    store, stats = built_store
    ids = train["sequence_id"].unique(maintain_order=True).to_list()
    assert stats["written"] == len(ids) and stats["skipped"] == 0
    assert sorted(p.stem for p in store.folder.glob("*.parquet")) == sorted(ids)
    for sid in ids[:: max(1, len(ids) // 25)]:
        assert pl.read_parquet(store.path(sid)).columns == ti.FRAME_FEATURES
        assert np.array_equal(store.read(sid), _fresh(train, sid), equal_nan=True)


def test_left_handed_sequences_are_stored_mirrored(train, built_store):
    store, _ = built_store
    left = train.filter(pl.col("handedness") == 0)["sequence_id"]
    if left.is_empty():
        pytest.skip("no left-handed subject in the tiny set")
    sid = left[0]
    rows = train.filter(pl.col("sequence_id") == sid)
    unmirrored = ti.frame_array(ti.build_frame_features(rows, mirror_left_handed=False)
                                .select(ti.FRAME_FEATURES).to_numpy())
    assert np.array_equal(store.read(sid), _fresh(train, sid), equal_nan=True)
    assert not np.array_equal(store.read(sid), unmirrored, equal_nan=True)


def test_second_build_skips_valid_files(train, built_store):
    store, _ = built_store
    again = ti.build_frame_feature_store(train, store, workers=1)
    assert again["written"] == 0 and again["skipped"] == again["sequences"]


def test_changed_feature_numbers_trigger_a_rebuild(train, built_store, warnings_seen, monkeypatch):
    store, stats = built_store
    manifest_path = store.folder / ti.FRAME_STORE_MANIFEST
    monkeypatch.setattr(ti, "GRAVITY", 9.5)                  # feature code that computes other numbers
    ti.feature_probe.cache_clear()
    older = ti.feature_record(True, "frames")
    monkeypatch.undo()
    ti.feature_probe.cache_clear()
    manifest = json.loads(manifest_path.read_text())
    manifest.update(older)
    manifest_path.write_text(json.dumps(manifest))
    rebuilt = ti.build_frame_feature_store(train, store, workers=2)
    assert rebuilt["written"] == stats["sequences"]
    assert f"holds feature version {older['feature_version']}" in warnings_seen.text
    assert json.loads(manifest_path.read_text())["feature_version"] == store.version


def test_a_store_is_never_served_for_other_data_with_the_same_ids_and_lengths(train, built_store, warnings_seen):
    # Real and synthetic sequence ids share one format: a store built on one data set must not serve another.
    store, stats = built_store
    other = train.with_columns(pl.col("acc_x") + 0.5)       # same ids, same lengths, other readings
    rebuilt = ti.build_frame_feature_store(other, store, workers=2)
    assert rebuilt["written"] == stats["sequences"] and "built from other data" in warnings_seen.text
    sid = train["sequence_id"][0]
    fresh = ti.frame_array(ti.build_frame_features(other.filter(pl.col("sequence_id") == sid))
                           .select(ti.FRAME_FEATURES).to_numpy())
    assert np.array_equal(store.read(sid), fresh, equal_nan=True)
    assert not np.array_equal(store.read(sid), _fresh(train, sid), equal_nan=True)
    assert ti.build_frame_feature_store(other, store)["written"] == 0        # and is served for its own data
    frames = ti.SequenceFrames.from_table(other, True)                        # the frame pass knows it too
    assert frames.fingerprint == ti.table_fingerprint(other, True) != ti.table_fingerprint(train, True)


def test_other_mirroring_setting_is_another_version(train, built_store):
    store, stats = built_store
    other = ti.FrameFeatureStore(store.folder, mirror_left_handed=False)
    assert other.version != store.version
    assert ti.build_frame_feature_store(train, other)["written"] == stats["sequences"]


def test_files_without_a_manifest_are_not_trusted(train, built_store, warnings_seen):
    store, stats = built_store
    (store.folder / ti.FRAME_STORE_MANIFEST).unlink()
    assert ti.build_frame_feature_store(train, store)["written"] == stats["sequences"]
    assert "no manifest" in warnings_seen.text


def test_corrupt_file_is_logged_recomputed_and_rewritten(train, built_store, warnings_seen):
    store, _ = built_store
    sid = train["sequence_id"][0]
    store.path(sid).write_bytes(b"PAR1 this is not parquet")
    cache = ti.FrameFeatureCache(store, 100, 2**30, raw_source=_raw_source(train))
    values = cache.get(sid)
    assert "unreadable" in warnings_seen.text and sid in warnings_seen.text
    assert cache.take_counts()["computed"] == 1
    assert np.array_equal(values, _fresh(train, sid), equal_nan=True)
    n = train.filter(pl.col("sequence_id") == sid).height
    assert store.is_valid(sid, n) and np.array_equal(store.read(sid), values, equal_nan=True)   # rewritten


def test_build_rewrites_a_truncated_file(train, built_store):
    store, _ = built_store
    sid = train["sequence_id"][0]
    data = store.path(sid).read_bytes()
    store.path(sid).write_bytes(data[: len(data) // 2])
    assert ti.build_frame_feature_store(train, store)["written"] == 1
    assert np.array_equal(store.read(sid), _fresh(train, sid), equal_nan=True)


def test_interrupted_write_leaves_no_partial_file(train, tmp_path, monkeypatch):
    store = ti.FrameFeatureStore(tmp_path / "fs")
    store.open("test data")
    frames = ti.build_frame_features(train.filter(pl.col("sequence_id") == train["sequence_id"][0]))

    def dies_halfway(self, file, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        store.write("SEQ_000001", frames)
    assert not store.path("SEQ_000001").exists()
    assert [p.name for p in store.folder.iterdir()] == [ti.FRAME_STORE_MANIFEST]   # no temp file left either


def test_lru_evicts_by_item_count(train, built_store):
    store, _ = built_store
    a, b, c = train["sequence_id"].unique(maintain_order=True).to_list()[:3]
    cache = ti.FrameFeatureCache(store, max_items=2, max_bytes=2**30)
    cache.get(a), cache.get(b), cache.get(a)               # a is now the most recent
    cache.get(c)                                           # evicts b, the least recently used
    assert a in cache and c in cache and b not in cache and len(cache) == 2
    counts = cache.take_counts()
    assert counts == {"hits": 1, "store_reads": 3, "computed": 0, "evicted": 1, "lookups": 4, "hit_rate": 0.25}
    assert cache.take_counts()["hits"] == 0                # counters reset


def test_lru_evicts_by_bytes(train, built_store):
    store, _ = built_store
    ids = train["sequence_id"].unique(maintain_order=True).to_list()[:3]
    sizes = [store.read(sid).nbytes for sid in ids]
    cache = ti.FrameFeatureCache(store, max_items=100, max_bytes=sizes[1] + sizes[2])
    for sid in ids:
        cache.get(sid)
    assert ids[0] not in cache and ids[1] in cache and ids[2] in cache
    assert cache.bytes == sizes[1] + sizes[2] <= cache.max_bytes
    tiny = ti.FrameFeatureCache(store, max_items=100, max_bytes=1)
    assert tiny.get(ids[0]).shape[1] == len(ti.FRAME_FEATURES) and len(tiny) == 0   # served, not kept


def test_second_pass_hits_memory_when_the_cache_is_large_enough(train, built_store):
    store, _ = built_store
    ids = train["sequence_id"].unique().to_list()
    cache = ti.FrameFeatureCache(store, max_items=len(ids), max_bytes=2**30)
    for sid in ids:
        cache.get(sid)
    assert cache.take_counts()["store_reads"] == len(ids)
    for sid in ids:
        cache.get(sid)
    assert cache.take_counts()["hit_rate"] == 1.0


def test_a_too_small_cache_says_so(train, built_store, warnings_seen):
    store, _ = built_store
    cache = ti.FrameFeatureCache(store, max_items=10, max_bytes=2**30)
    assert cache.warn_if_too_small(400, 20_000)
    assert "FRAME_CACHE_MAX_ITEMS" in warnings_seen.text
    assert not ti.FrameFeatureCache(store, 1000, 2**30).warn_if_too_small(400, 20_000)


def test_missing_frames_are_computed_from_raw_and_stored(train, tmp_path):
    store = ti.FrameFeatureStore(tmp_path / "fs")
    store.open("test data")
    sid = train["sequence_id"][0]
    cache = ti.FrameFeatureCache(store, 10, 2**30, raw_source=_raw_source(train))
    assert np.array_equal(cache.get(sid), _fresh(train, sid), equal_nan=True)
    assert cache.take_counts()["computed"] == 1 and store.path(sid).is_file()
    with pytest.raises(KeyError, match="no raw data"):
        ti.FrameFeatureCache(store, 10, 2**30).get("SEQ_999999")


def test_missing_values_stay_nan_until_a_model_consumes_them(train, built_store):
    store, _ = built_store
    cache = ti.FrameFeatureCache(store, 1000, 2**30)
    ids = train["sequence_id"].unique(maintain_order=True).to_list()
    assert any(np.isnan(cache.get(sid)).any() for sid in ids)          # ToF -1, null sensors: NaN, not 0
    inputs = ti.DeepInputs(cache, ids, np.ones(len(ids)))
    x, mask = inputs.take("full", 90, np.arange(len(ids)))
    assert np.isnan(x).any() and x.dtype == np.float32 and mask.shape == x.shape[:2]   # still NaN: missing
    z = ti.standardize_frames(x, mask, *ti.frame_statistics(x, mask))                # what a model consumes
    assert np.isfinite(z).all() and (z[mask == 0] == 0).all()


def test_padding_keeps_the_last_frames_at_the_last_positions():
    values = np.arange(10 * 2, dtype=np.float32).reshape(10, 2) + 1
    cut, mask = ti.pad_last_frames(values, 4)
    assert np.array_equal(cut, values[-4:]) and mask.tolist() == [1, 1, 1, 1]
    padded, mask = ti.pad_last_frames(values[:3], 5)                # padding in front: [0, 0, 1, 2, 3]
    assert np.array_equal(padded[2:], values[:3]) and not padded[:2].any() and mask.tolist() == [0, 0, 1, 1, 1]
    empty, mask = ti.pad_last_frames(values[:0], 3)
    assert not empty.any() and not mask.any()


def test_padded_frames_for_a_list_of_sequences(train, built_store):
    store, _ = built_store
    ids = train["sequence_id"].unique(maintain_order=True).to_list()[:7]
    cache = ti.FrameFeatureCache(store, 100, 2**30)
    x, mask = ti.padded_frames(cache, ids, 90)
    assert x.shape == (7, 90, len(ti.FRAME_FEATURES)) and mask.shape == (7, 90)
    lengths = train.filter(pl.col("sequence_id").is_in(ids)).group_by("sequence_id", maintain_order=True).len()
    assert mask.sum(axis=1).tolist() == [min(n, 90) for n in lengths["len"].to_list()]


def test_preload_reads_the_store_in_threads_then_hits(train, built_store):
    store, _ = built_store
    ids = train["sequence_id"].unique().to_list()
    cache = ti.FrameFeatureCache(store, max_items=len(ids), max_bytes=2**30)
    cache.preload(ids, workers=2)
    assert cache.take_counts()["store_reads"] == len(ids) and len(cache) == len(ids)
    for sid in ids:
        cache.get(sid)
    assert cache.take_counts()["hit_rate"] == 1.0


def test_a_file_without_nulls_reads_back_writable(tmp_path):
    # polars hands out a read-only zero-copy view for a null-free float table; reading must copy.
    store = ti.FrameFeatureStore(tmp_path / "fs")
    store.open("test data")
    frames = pl.DataFrame({name: np.array([1.0, np.inf, 3.0], dtype=np.float32) for name in ti.FRAME_FEATURES})
    store.write("SEQ_000001", frames)
    values = store.read("SEQ_000001")
    assert values.flags.writeable and np.isnan(values[1]).all() and (values[0] == 1).all()
    view = np.ones((2, 3), dtype=np.float32)
    view.flags.writeable = False
    ti.frame_array(view)                                     # no "assignment destination is read-only"


# ── One frame pass per run, one array per route ────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def frame_pass(train):
    return ti.SequenceFrames.from_table(train, mirror_left_handed=True)


def test_the_frame_pass_equals_the_frame_features_of_the_table(train, frame_pass):
    assert frame_pass.table().equals(ti.build_frame_features(train))
    assert frame_pass.ids == ti.sequence_table(train)["sequence_id"].to_list()
    assert frame_pass.lengths.sum() == train.height
    with pytest.raises(ValueError):
        frame_pass.sequence(0)[0, 0] = 1.0                  # the views handed to the cache are read-only


def test_the_frame_pass_feeds_the_store_and_the_aggregates(train, frame_pass, built_store, tmp_path):
    store = ti.FrameFeatureStore(tmp_path / "from_pass")
    stats = ti.build_frame_feature_store(train, store, workers=2, frames=frame_pass)
    assert stats["written"] == len(frame_pass.ids)
    reference, _ = built_store                               # built the old way, from the raw rows
    for sid in frame_pass.ids[:: max(1, len(frame_pass.ids) // 20)]:
        assert np.array_equal(store.read(sid), reference.read(sid), equal_nan=True)
    assert ti.build_feature_table(train, True, frame_pass).equals(ti.build_feature_table(train, True))
    with pytest.raises(ValueError, match="mirror"):
        ti.build_frame_feature_store(train, ti.FrameFeatureStore(tmp_path / "other", False), frames=frame_pass)


@pytest.mark.parametrize("variant,pad_len", [("imu", 90), ("full", 90), ("full", 37)])
def test_route_arrays_equal_the_per_sequence_path(train, frame_pass, variant, pad_len):
    cache = ti.frame_cache_for_run(frame_pass, None, ti.FrameCacheConfig())
    inputs = ti.DeepInputs(cache, frame_pass.ids, frame_pass.lengths)
    x, mask = inputs.arrays(variant, pad_len)
    assert x.shape == (len(frame_pass.ids), pad_len, len(ti.deep_channels(variant)))
    for i, sid in enumerate(frame_pass.ids):
        alone = ti.build_frame_features(train.filter(pl.col("sequence_id") == sid))   # as predict() computes it
        channels = ti.SequenceInputs(ti.frame_array(alone.select(ti.FRAME_FEATURES).to_numpy()), {}).channels(variant)
        expected, expected_mask = ti.pad_last_frames(channels, pad_len)
        assert np.array_equal(x[i], expected, equal_nan=True), sid
        assert np.array_equal(mask[i], expected_mask), sid
    assert inputs.arrays(variant, pad_len)[0] is x            # built once, then shared


def test_route_arrays_are_built_once_from_memory_and_logged(train, frame_pass, warnings_seen):
    cache = ti.frame_cache_for_run(frame_pass, None, ti.FrameCacheConfig())
    assert cache.max_items == len(frame_pass.ids) and len(cache) == len(frame_pass.ids)   # sized from the data
    assert "sized from the data" in warnings_seen.text
    inputs = ti.DeepInputs(cache, frame_pass.ids, frame_pass.lengths)
    for _ in range(3):                                        # three "folds" of two families
        inputs.take("full", 90, np.arange(0, len(frame_pass.ids), 2))
        inputs.take("imu", 90, np.arange(1, len(frame_pass.ids), 2))
    built = {r.getMessage() for r in warnings_seen.records if "built once" in r.getMessage()}   # a record may reach caplog twice
    assert len(built) == 2 and all("hit rate 100.0%" in line and " 0 store reads" in line for line in built)
    assert cache.take_counts()["lookups"] == 0                # the folds looked nothing up


def test_a_byte_bound_smaller_than_the_data_primes_what_fits_and_says_so(train, frame_pass, built_store,
                                                                      warnings_seen, monkeypatch):
    monkeypatch.setenv("FRAME_CACHE_MAX_MB", "1")
    store, _ = built_store
    cache = ti.frame_cache_for_run(frame_pass, store, ti.FrameCacheConfig())
    assert 0 < len(cache) < len(frame_pass.ids) and cache.bytes <= 2**20 and cache.counts["evicted"] == 0
    assert "FRAME_CACHE_MAX_MB" in warnings_seen.text
    x, _ = ti.DeepInputs(cache, frame_pass.ids, frame_pass.lengths).arrays("full", 90)   # the rest from the store
    counts_line = [r.getMessage() for r in warnings_seen.records if "built once" in r.getMessage()][0]
    assert "store reads" in counts_line and " 0 store reads" not in counts_line
    monkeypatch.delenv("FRAME_CACHE_MAX_MB")
    everything = ti.frame_cache_for_run(frame_pass, None, ti.FrameCacheConfig())
    assert np.array_equal(x, ti.DeepInputs(everything, frame_pass.ids, frame_pass.lengths).arrays("full", 90)[0],
                          equal_nan=True)


def test_no_fold_of_either_deep_family_reads_a_frame(train, frame_pass, tmp_path, monkeypatch):
    cache = ti.frame_cache_for_run(frame_pass, None, ti.FrameCacheConfig())
    inputs = ti.DeepInputs(cache, frame_pass.ids, frame_pass.lengths)
    for variant in ti.VARIANTS:
        inputs.arrays(variant, 90)                           # what the first fold of the first family triggers

    def no_lookup(*args, **kwargs):
        raise AssertionError("a fold looked a sequence up")

    monkeypatch.setattr(ti.FrameFeatureCache, "get", no_lookup)
    monkeypatch.setattr(ti.FrameFeatureStore, "read", no_lookup)
    monkeypatch.setattr(ti, "build_frame_features", no_lookup)
    sequences = ti.sequence_table(train)
    folds = ti.make_folds(sequences, 2, 0)
    monkeypatch.setenv("DL_BATCH_SIZE", "64")
    monkeypatch.setenv("KERAS_BATCH_SIZE", "64")
    dl_cfg, keras_cfg = ti.DLConfig(), ti.KerasConfig()
    dl_cfg.EPOCHS = keras_cfg.EPOCHS = 1
    recipe = ti.RecipeConfig()
    torch_result = ti.train_torch(inputs, sequences, folds, "full", dl_cfg, recipe, 0, tmp_path)
    keras_result = ti.train_keras(inputs, sequences, folds, "imu", keras_cfg, ti.KerasSpeedConfig(), recipe, 0,
                                  tmp_path)
    assert np.isfinite(torch_result.oof_probs[torch_result.eval_mask]).all()
    assert np.isfinite(keras_result.oof_probs).all()
    with pytest.raises(ValueError, match="other sequences"):
        ti.train_torch(ti.DeepInputs(cache, frame_pass.ids[::-1], frame_pass.lengths), sequences, folds, "full",
                       dl_cfg, recipe, 0, tmp_path)
