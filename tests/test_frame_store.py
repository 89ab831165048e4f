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
    return ti.clean_frame_array(frames.select(ti.FRAME_FEATURES).to_numpy())


def test_store_frames_equal_frames_computed_fresh(train, built_store):
    store, stats = built_store
    ids = train["sequence_id"].unique(maintain_order=True).to_list()
    assert stats["written"] == len(ids) and stats["skipped"] == 0
    assert sorted(p.stem for p in store.folder.glob("*.parquet")) == sorted(ids)
    for sid in ids[:: max(1, len(ids) // 25)]:
        assert pl.read_parquet(store.path(sid)).columns == ti.FRAME_FEATURES
        assert np.array_equal(store.read(sid), _fresh(train, sid))


def test_left_handed_sequences_are_stored_mirrored(train, built_store):
    store, _ = built_store
    left = train.filter(pl.col("handedness") == 0)["sequence_id"]
    if left.is_empty():
        pytest.skip("no left-handed subject in the tiny set")
    sid = left[0]
    rows = train.filter(pl.col("sequence_id") == sid)
    unmirrored = ti.clean_frame_array(ti.build_frame_features(rows, mirror_left_handed=False)
                                      .select(ti.FRAME_FEATURES).to_numpy())
    assert np.array_equal(store.read(sid), _fresh(train, sid))
    assert not np.array_equal(store.read(sid), unmirrored)


def test_second_build_skips_valid_files(train, built_store):
    store, _ = built_store
    again = ti.build_frame_feature_store(train, store, workers=1)
    assert again["written"] == 0 and again["skipped"] == again["sequences"]


def test_changed_feature_version_triggers_a_rebuild(train, built_store, warnings_seen):
    store, stats = built_store
    manifest_path = store.folder / ti.FRAME_STORE_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["feature_version"] = "older0000000000"
    manifest_path.write_text(json.dumps(manifest))
    rebuilt = ti.build_frame_feature_store(train, store, workers=2)
    assert rebuilt["written"] == stats["sequences"]
    assert "holds feature version older0000000000" in warnings_seen.text
    assert json.loads(manifest_path.read_text())["feature_version"] == store.version


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
    assert np.array_equal(values, _fresh(train, sid))
    n = train.filter(pl.col("sequence_id") == sid).height
    assert store.is_valid(sid, n) and np.array_equal(store.read(sid), values)   # rewritten


def test_build_rewrites_a_truncated_file(train, built_store):
    store, _ = built_store
    sid = train["sequence_id"][0]
    data = store.path(sid).read_bytes()
    store.path(sid).write_bytes(data[: len(data) // 2])
    assert ti.build_frame_feature_store(train, store)["written"] == 1
    assert np.array_equal(store.read(sid), _fresh(train, sid))


def test_interrupted_write_leaves_no_partial_file(train, tmp_path, monkeypatch):
    store = ti.FrameFeatureStore(tmp_path / "fs")
    store.open()
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
    assert counts == {"hits": 1, "store_reads": 3, "computed": 0, "evicted": 1, "hit_rate": 0.25}
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
    store.open()
    sid = train["sequence_id"][0]
    cache = ti.FrameFeatureCache(store, 10, 2**30, raw_source=_raw_source(train))
    assert np.array_equal(cache.get(sid), _fresh(train, sid))
    assert cache.take_counts()["computed"] == 1 and store.path(sid).is_file()
    with pytest.raises(KeyError, match="no raw data"):
        ti.FrameFeatureCache(store, 10, 2**30).get("SEQ_999999")


def test_no_nan_or_inf_reaches_a_model(train, built_store):
    store, _ = built_store
    cache = ti.FrameFeatureCache(store, 1000, 2**30)
    for sid in train["sequence_id"].unique().to_list()[:50]:
        assert np.isfinite(cache.get(sid)).all()


def test_padding_keeps_the_last_frames():
    values = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    cut, mask = ti.pad_last_frames(values, 4)
    assert np.array_equal(cut, values[-4:]) and mask.tolist() == [1, 1, 1, 1]
    padded, mask = ti.pad_last_frames(values[:3], 5)
    assert np.array_equal(padded[:3], values[:3]) and not padded[3:].any() and mask.tolist() == [1, 1, 1, 0, 0]


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


def test_load_padded_frames_logs_the_hit_rate(train, built_store, warnings_seen):
    store, _ = built_store
    ids = train["sequence_id"].unique().to_list()[:20]
    cache = ti.FrameFeatureCache(store, 100, 2**30)
    ti.load_padded_frames(cache, ids, 90, "fold 0 epoch 1")
    ti.load_padded_frames(cache, ids, 90, "fold 0 epoch 2")
    assert "fold 0 epoch 1: 20 sequences through the frame cache" in warnings_seen.text
    assert "fold 0 epoch 2: 20 sequences through the frame cache" in warnings_seen.text
    assert "hit rate 100.0% (20 hits, 0 store reads" in warnings_seen.text


def test_a_file_without_nulls_reads_back_writable(tmp_path):
    # polars hands out a read-only zero-copy view for a null-free float table; cleaning must copy.
    store = ti.FrameFeatureStore(tmp_path / "fs")
    store.open()
    frames = pl.DataFrame({name: np.array([1.0, np.inf, 3.0], dtype=np.float32) for name in ti.FRAME_FEATURES})
    store.write("SEQ_000001", frames)
    values = store.read("SEQ_000001")
    assert values.flags.writeable and values[1].tolist() == [0.0] * len(ti.FRAME_FEATURES)
    view = np.ones((2, 3), dtype=np.float32)
    view.flags.writeable = False
    ti.clean_frame_array(view)                               # no "assignment destination is read-only"
