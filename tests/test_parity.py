"""Train/serve parity: predict()'s own path, from the raw rows the gateway sends, reproduces the out-of-fold
probabilities training recorded, for each family alone and for the blend; and each check fails when one step of
the path (mirroring, a channel, the statistics, the pad side or length) differs from training's."""
import json
import re

import numpy as np
import polars as pl
import pytest

import train_infer as ti
from conftest import models_of

pytest.importorskip("torch")
pytest.importorskip("keras")

FAMILIES = ("lgbm", "torch", "keras")
ATOL = 1e-4


@pytest.fixture(scope="module")
def parity_cases(all_families_run, tiny_data):
    """The training run, its fold k, and what the gateway would send for chosen sequences of that fold: test.csv's
    columns only (in another order) and the subject's demographics row, read from the CSVs as the gateway reads."""
    out, _ = all_families_run
    oof = pl.read_parquet(out / "oof_predictions.parquet")
    train = pl.read_csv(tiny_data / "train.csv")
    demographics = pl.read_csv(tiny_data / "train_demographics.csv")
    left_handed = set(demographics.filter(pl.col("handedness") == 0)["subject"])
    per_sequence = train.group_by("sequence_id").agg(
        pl.len().alias("n"), pl.col("subject").first(),
        pl.all_horizontal(pl.col(c).is_null().all() for c in ti.THM_COLUMNS + ti.TOF_COLUMNS).alias("imu_only"),
        pl.any_horizontal(pl.col(c).is_null().all() for c in ti.THM_COLUMNS + ti.TOF_COLUMNS).alias("null_sensor"))
    table = oof.select("sequence_id", "fold").join(per_sequence, on="sequence_id")
    table = table.with_columns(pl.col("subject").is_in(list(left_handed)).alias("left"))
    pad_len = ti.DLConfig().FIXED_PAD_LEN                      # DL_FIXED_PAD_LEN and KERAS_FIXED_PAD_LEN unset
    assert pad_len == ti.KerasConfig().FIXED_PAD_LEN
    wanted = {
        "left-handed, shorter than the pad": pl.col("left") & ~pl.col("null_sensor") & (pl.col("n") < pad_len),
        "left-handed, longer than the pad": pl.col("left") & (pl.col("n") > pad_len) & ~pl.col("imu_only"),
        "IMU-only (all thm/tof null)": pl.col("imu_only"),
        "right-handed, longer than the pad": ~pl.col("left") & (pl.col("n") > pad_len) & ~pl.col("null_sensor"),
        "one sensor null": pl.col("null_sensor") & ~pl.col("imu_only"),
        "right-handed, shorter than the pad": ~pl.col("left") & (pl.col("n") < pad_len) & ~pl.col("null_sensor"),
    }
    for fold in sorted(set(table["fold"])):
        rows = table.filter(pl.col("fold") == fold).sort("sequence_id")
        chosen = {what: rows.filter(rule)["sequence_id"].head(1).to_list() for what, rule in wanted.items()}
        if all(chosen.values()):
            break
    assert all(chosen.values()), f"no fold of the tiny set has every kind of sequence: {chosen}"
    cases = []
    columns = list(reversed(ti.TEST_COLUMNS))                  # another column order than test.csv's
    for what, (sequence_id,) in chosen.items():
        rows = train.filter(pl.col("sequence_id") == sequence_id).select(columns)
        subject = rows["subject"][0]
        cases.append({"what": what, "sequence_id": sequence_id, "sequence": rows,
                      "demographics": demographics.filter(pl.col("subject") == subject),
                      "has_thm_tof": not table.filter(pl.col("sequence_id") == sequence_id)["imu_only"][0],
                      "oof": oof.filter(pl.col("sequence_id") == sequence_id)})
    return {"out": out, "fold": fold, "cases": cases, "manifest": json.loads((out / "artifacts.json").read_text())}


def _fold_only(spec, fold):
    """A manifest entry of one family and variant cut to fold ``fold``'s models (every seed), without refits."""
    keep = [p for p in spec["models"] if re.search(rf"_fold{fold}(_seed\d+)?\.", p)]
    assert keep, spec["models"]
    return spec | {"models": keep, "refit_models": []}


def _predictor(parity_cases, tmp_path_factory, families):
    """predict()'s predictor over fold k's models of ``families`` ({family: [variants]}) only."""
    saved = parity_cases["manifest"]["families"]
    folder = models_of(parity_cases["out"], tmp_path_factory.mktemp("parity_models"), {
        family: {v: _fold_only(saved[family][v], parity_cases["fold"]) for v in variants}
        for family, variants in families.items()})
    return ti.GesturePredictor(folder, ti._ThrottledWarnings(), strict=True)


def _oof_row(case, family, variant):
    return np.array([case["oof"][f"{family}_{variant}__{g}"][0] for g in ti.GESTURES], dtype=np.float64)


def _served(predictor, case):
    """The probabilities predict() computes for a case: its door, then its probabilities."""
    sequence, demographics = predictor.admit(case["sequence"], case["demographics"])
    return predictor.predict_proba(sequence, demographics)


def parity_gaps(predictor, cases, family, variant):
    """{case: largest |served - out-of-fold| over the 18 probabilities} for the cases this variant answers."""
    gaps = {}
    for case in cases:
        if variant == "full" and not case["has_thm_tof"]:
            continue                                       # the full variant has no out-of-fold row there
        probs, route = _served(predictor, case)
        assert route == variant
        gaps[case["what"]] = float(np.abs(probs - _oof_row(case, family, variant)).max())
    return gaps


@pytest.fixture(scope="module")
def single_family(parity_cases, tmp_path_factory):
    """One predictor per family and variant, each with only fold k's model of that family loaded."""
    return {(family, variant): _predictor(parity_cases, tmp_path_factory, {family: [variant]})
            for family in FAMILIES for variant in ti.VARIANTS}


@pytest.mark.parametrize("variant", ti.VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_one_family_from_raw_rows(family, variant, single_family, parity_cases):
    gaps = parity_gaps(single_family[family, variant], parity_cases["cases"], family, variant)
    assert len(gaps) >= (6 if variant == "imu" else 5)
    assert max(gaps.values()) < ATOL, gaps


@pytest.mark.parametrize("variant", ti.VARIANTS)
@pytest.mark.parametrize("family", ("torch", "keras"))
def test_orientation_head_parity_from_raw_rows(family, variant, single_family, parity_cases):
    """The orientation probabilities predict() keeps for the per-subject history equal the out-of-fold rows
    training saved (the orientation head trains by default in both deep families)."""
    predictor = single_family[family, variant]
    columns = [f"{family}_{variant}__orientation__{o}" for o in ti.ORIENTATIONS]
    checked = 0
    for case in parity_cases["cases"]:
        if variant == "full" and not case["has_thm_tof"]:
            continue
        sequence, demographics = predictor.admit(case["sequence"], case["demographics"])
        served = predictor.predict_sequence(sequence, demographics).orientation
        recorded = np.array([case["oof"][c][0] for c in columns], dtype=np.float64)
        np.testing.assert_allclose(served, recorded, atol=ATOL, err_msg=case["what"])
        checked += 1
    assert checked >= 5


def test_the_orientation_heads_accuracy_is_logged_and_saved_per_route(parity_cases):
    """Out of fold, per deep family and route: in the manifest, summary.csv and the log, and equal to what the
    saved out-of-fold orientation probabilities give against the truth."""
    out, manifest = parity_cases["out"], parity_cases["manifest"]
    summary = pl.read_csv(out / "summary.csv")
    oof = pl.read_parquet(out / "oof_predictions.parquet")
    log = (out / "train_log.txt").read_text()
    truth = oof["orientation"].replace_strict(ti.ORIENTATION_TO_INDEX, return_dtype=pl.Int64).to_numpy()
    for family in ("torch", "keras"):
        for variant in ti.VARIANTS:
            accuracy = manifest["families"][family][variant]["orientation_accuracy"]
            probs = oof.select([f"{family}_{variant}__orientation__{o}" for o in ti.ORIENTATIONS]).to_numpy()
            scored = np.isfinite(probs).all(axis=1)
            assert scored.sum() >= 40
            assert accuracy == pytest.approx(float((probs[scored].argmax(axis=1) == truth[scored]).mean()))
            row = summary.filter((pl.col("family") == family) & (pl.col("route") == variant))
            assert row["orientation_accuracy"][0] == pytest.approx(accuracy, abs=1e-4)
            assert re.search(rf"{family.capitalize()} {variant:<4} \| orientation head: out-of-fold accuracy "
                             rf"{accuracy:.4f}", log)
    assert manifest["families"]["lgbm"]["full"]["orientation_accuracy"] is None


def test_parity_blend_of_every_family(parity_cases, tmp_path_factory):
    """Fold k's models of all three families, both routes: predict_proba equals the out-of-fold blend with the
    manifest's weights, and predict() answers that blend's decision."""
    families = {family: list(ti.VARIANTS) for family in FAMILIES}
    predictor = _predictor(parity_cases, tmp_path_factory, families)
    ensemble = parity_cases["manifest"]["ensemble"]
    decoding = parity_cases["manifest"]["decoding"]
    predictor.assigner = None                              # the per-subject assignment is measured elsewhere
    ti.configure_inference(predictor.model_dir)
    ti._PREDICTOR_STATE["predictor"] = predictor
    try:
        for case in parity_cases["cases"]:
            route = "full" if case["has_thm_tof"] else "imu"
            weights = np.array(ensemble[route]["weights"])
            expected = ti.blend(np.stack([_oof_row(case, f, route) for f in ensemble[route]["families"]]), weights)
            probs, served_route = _served(predictor, case)
            assert served_route == route
            np.testing.assert_allclose(probs, expected, atol=ATOL, err_msg=case["what"])
            answer = ti.predict(case["sequence"], case["demographics"])
            assert answer == ti.GESTURES[ti.decide_gestures(expected[None], decoding)[0]], case["what"]
        assert ti.answer_counts()["fallbacks"] == 0
    finally:
        ti.configure_inference(None)


# ── Each parity check fails when one step of predict()'s path differs from training's ──────────────────
# A breakage changes one step of the serving path: (predictor, monkeypatch, parity_cases) -> None.
ORIGINAL_PAD = ti.pad_last_frames
ORIGINAL_CHANNELS = ti.deep_frame_channels


def _pad_behind(values, pad_len):
    x, mask = ORIGINAL_PAD(values, pad_len)
    n = int(mask.sum())
    return np.roll(x, n - pad_len, axis=0), np.roll(mask, n - pad_len)


def _pad_shorter(values, pad_len):
    return ORIGINAL_PAD(values[-(pad_len - 30):], pad_len)


def _channel_list_without_lin_x(values, variant):
    """The channels with one left out, as a wrong channel list gives: every later channel moves up one place and
    the last is missing."""
    out = ORIGINAL_CHANNELS(values, variant)
    dropped = np.delete(out, ti.deep_channels(variant).index("lin_x"), axis=1)
    return np.concatenate([dropped, np.full((len(out), 1), np.nan, np.float32)], axis=1)


def _loaded_family(predictor):
    (_, loaded), = [entry for entries in predictor.models.values() for entry in entries]
    return loaded


def mirroring_off(predictor, monkeypatch, parity_cases):
    monkeypatch.setattr(predictor, "mirror", False)


def a_channel_dropped(predictor, monkeypatch, parity_cases):
    monkeypatch.setattr(ti, "deep_frame_channels", _channel_list_without_lin_x)


def pad_on_the_other_side(predictor, monkeypatch, parity_cases):
    monkeypatch.setattr(ti, "pad_last_frames", _pad_behind)


def pad_30_frames_shorter(predictor, monkeypatch, parity_cases):
    monkeypatch.setattr(ti, "pad_last_frames", _pad_shorter)


def statistics_of_the_other_fold(predictor, monkeypatch, parity_cases):
    """The loaded model gets the other fold's standardisation statistics (it is edited: a predictor of its own)."""
    loaded, other = _loaded_family(predictor), 1 - parity_cases["fold"]
    models, stem = parity_cases["out"] / "models", f"{loaded.variant}_fold{other}"
    if isinstance(loaded, ti.TorchFamily):
        import torch
        ck = torch.load(models / f"torch_{stem}.pt", weights_only=True)
        net, _, _, pad_len = loaded.models[0]
        loaded.models[0] = (net, ck["mean"].numpy(), ck["std"].numpy(), pad_len)
    else:
        import keras
        ti.keras_layers()
        other_model = keras.saving.load_model(models / f"keras_{stem}.keras")
        loaded.model.get_layer("standardize").set_weights(other_model.get_layer("standardize").get_weights())


def its_top_aggregate_dropped(predictor, monkeypatch, parity_cases):
    """LightGBM's aggregate row without the column its trees gain most from (NaN, as if not computed)."""
    loaded = _loaded_family(predictor)
    top = loaded.column_index[int(np.argmax(loaded.models[0].feature_importance("gain")))]
    original = ti.SequenceInputs.aggregate_row.fget

    def without_it(inputs):
        row = original(inputs).copy()
        row[top] = np.nan
        return row

    monkeypatch.setattr(ti.SequenceInputs, "aggregate_row", property(without_it))


DEEP_BREAKAGES = (mirroring_off, a_channel_dropped, pad_on_the_other_side, pad_30_frames_shorter,
                  statistics_of_the_other_fold)
BREAKAGES = [(family, b) for family in ("torch", "keras") for b in DEEP_BREAKAGES] + [
    ("lgbm", mirroring_off), ("lgbm", its_top_aggregate_dropped)]
# The cases a breakage changes the inputs of (unlisted: every case). Mirroring touches left-handed subjects only,
# the pad's side sequences shorter than the pad only, its length sequences longer than it only.
EXPOSED_BY = {mirroring_off: ("left-handed, shorter than the pad", "left-handed, longer than the pad"),
              pad_on_the_other_side: ("left-handed, shorter than the pad", "right-handed, shorter than the pad"),
              pad_30_frames_shorter: ("left-handed, longer than the pad", "right-handed, longer than the pad")}


@pytest.mark.parametrize("family,breakage", BREAKAGES, ids=[f"{f}-{b.__name__}" for f, b in BREAKAGES])
def test_parity_check_fails_on_a_deliberate_breakage(family, breakage, parity_cases, single_family,
                                                      tmp_path_factory, monkeypatch):
    """The parity check, run against a predict() path with one step changed, sees the difference on the cases
    that step touches, by more than ten times its tolerance."""
    variant = "full"
    predictor = (_predictor(parity_cases, tmp_path_factory, {family: [variant]})
                 if breakage is statistics_of_the_other_fold else single_family[family, variant])
    assert max(parity_gaps(predictor, parity_cases["cases"], family, variant).values()) < ATOL
    breakage(predictor, monkeypatch, parity_cases)
    broken = parity_gaps(predictor, parity_cases["cases"], family, variant)
    assert max(broken[what] for what in EXPOSED_BY.get(breakage, broken)) > 10 * ATOL, broken
