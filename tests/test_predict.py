"""End to end on tiny data, reload for inference, and predict() on bad input: always a valid gesture."""
import json

import numpy as np
import polars as pl
import pytest

import train_infer as ti
from conftest import REAL_DIR, copy_artifacts, other_features_record


def _test_sequences(tiny_data):
    test = pl.read_csv(tiny_data / "test.csv")
    demographics = pl.read_csv(tiny_data / "test_demographics.csv")
    return list(ti._gateway_sequences(test, demographics, seed=0))


def test_end_to_end_trains_saves_and_answers_every_test_sequence(trained_run, tiny_data):
    out, result = trained_run
    assert {"artifacts.json", "fold_metrics.csv", "oof_predictions.parquet", "summary.csv", "submission.csv",
            "train_log.txt", "run_summary.json"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "artifacts.json").read_text())
    joint = manifest["per_subject"]["assignment"] == "joint"      # the orientation classifier, read only then
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted(
        [f"lgbm_{v}_fold{k}.txt" for v in ("imu", "full") for k in range(2)] + ["orientation_lgbm.txt"] * joint)
    assert manifest["feature_version"] == ti.feature_version(True)
    assert "lightgbm" in manifest["library_versions"] and manifest["classes"] == list(ti.GESTURES)
    submission = pl.read_csv(out / "submission.csv")
    test_ids = pl.read_csv(tiny_data / "test.csv")["sequence_id"].unique().sort()
    assert submission.columns == ["sequence_id", "gesture"]
    assert submission["sequence_id"].sort().equals(test_ids)
    assert submission["gesture"].is_in(ti.GESTURES).all()
    assert result["inference"]["warnings"].get("fallback", 0) == 0   # no answer came from the fail-safe
    folds = pl.read_csv(out / "fold_metrics.csv")
    assert folds.height == 4 and {"binary_f1", "macro_f1", "score"} <= set(folds.columns)
    oof = pl.read_parquet(out / "oof_predictions.parquet")
    assert oof.height == pl.read_csv(tiny_data / "train.csv")["sequence_id"].n_unique()
    # the models learned something: far above the 1/18 chance level on held-out subjects
    assert result["inference"]["synthetic_test"]["all"]["score"] > 0.4
    summary = {r["route"]: r for r in result["summary"]}
    assert summary["imu"]["oof_score"] > 0.3 and summary["full"]["oof_score"] > 0.3


def test_infer_only_reloads_and_gives_the_same_answers(trained_run, tiny_data, tmp_path):
    out, _ = trained_run
    ti.main(["--infer-only", "--model-dir", str(out), "--data-dir", str(tiny_data), "--output-dir", str(tmp_path)])
    assert pl.read_csv(tmp_path / "submission.csv").equals(pl.read_csv(out / "submission.csv"))
    assert not (tmp_path / "models").exists()


def _errors_logged(output_dir):
    """ERROR lines of a run's log (main() gives the logger its own handlers, so caplog does not see them)."""
    return [line for line in (output_dir / "train_log.txt").read_text().splitlines() if " ERROR " in line]


def _with_other_features(trained_run, folder):
    copy_artifacts(trained_run[0], folder)
    manifest = json.loads((folder / "artifacts.json").read_text())
    manifest.update(other_features_record("models"))
    (folder / "artifacts.json").write_text(json.dumps(manifest))
    return folder


def test_infer_only_refuses_artifacts_from_other_features(trained_run, tiny_data, tmp_path):
    stale = _with_other_features(trained_run, tmp_path / "stale")
    with pytest.raises(SystemExit, match="feature version"):
        ti.main(["--infer-only", "--model-dir", str(stale), "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "o")])


def test_the_rerun_serves_artifacts_from_other_features_and_says_so_loudly(trained_run, tiny_data, tmp_path,
                                                                          monkeypatch):
    # A stopped rerun is a failed submission: the same check logs an error there and serves.
    stale = _with_other_features(trained_run, tmp_path / "stale")
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    result = ti.main(["--infer-only", "--model-dir", str(stale), "--data-dir", str(tiny_data),
                      "--output-dir", str(tmp_path / "o")])
    errors = _errors_logged(tmp_path / "o")
    assert sum("feature version" in e and "SERVING ANYWAY" in e for e in errors) == 1   # once, not per check
    assert result["inference"]["fallbacks"] == 0 and result["inference"]["answers"] > 0
    assert pl.read_csv(tmp_path / "o" / "submission.csv")["gesture"].is_in(ti.GESTURES).all()


def test_the_predictor_applies_the_same_feature_check(trained_run, tmp_path, warnings_seen):
    stale = _with_other_features(trained_run, tmp_path / "stale")
    with pytest.raises(ti.ConfigError, match="feature version"):
        ti.GesturePredictor(stale, ti._ThrottledWarnings(), strict=True)
    ti.GesturePredictor(stale, ti._ThrottledWarnings(), strict=False)       # predict()'s lazy load serves
    assert "SERVING ANYWAY" in warnings_seen.text
    ti.GesturePredictor(trained_run[0], ti._ThrottledWarnings(), strict=True)  # its own features: fine


def test_infer_only_loads_every_family_first_and_names_the_file_that_fails(trained_run, tiny_data, tmp_path):
    broken = copy_artifacts(trained_run[0], tmp_path / "broken")
    (broken / "models" / "lgbm_full_fold1.txt").write_text("not a model")
    with pytest.raises(SystemExit, match="lgbm_full_fold1.txt"):
        ti.main(["--infer-only", "--model-dir", str(broken), "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "submission.csv").exists()          # stopped before the first answer
    (broken / "models" / "lgbm_imu_fold0.txt").unlink()
    with pytest.raises(SystemExit, match="lgbm_imu_fold0.txt is missing"):
        ti.main(["--infer-only", "--model-dir", str(broken), "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "o")])


def test_the_rerun_serves_what_loaded_logs_each_failure_once_and_counts_answers(trained_run, tiny_data, tmp_path,
                                                                               monkeypatch):
    broken = copy_artifacts(trained_run[0], tmp_path / "broken")
    (broken / "models" / "lgbm_full_fold1.txt").write_text("not a model")
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    result = ti.main(["--infer-only", "--model-dir", str(broken), "--data-dir", str(tiny_data),
                      "--output-dir", str(tmp_path / "o")])
    errors = _errors_logged(tmp_path / "o")
    assert sum("lgbm/full could not be loaded" in e and "lgbm_full_fold1.txt" in e and "answers without it" in e
               for e in errors) == 1                                   # once, framed, however many answers
    assert any(e.endswith("!" * 100) for e in errors) and any("Not loaded, not used: lgbm/full" in e for e in errors)
    inference = result["inference"]
    n_test = pl.read_csv(tiny_data / "test.csv")["sequence_id"].n_unique()
    assert inference["answers"] == n_test and inference["fallbacks"] == 0
    assert inference["by_family"] == {"lgbm/imu": n_test}        # every answer from the family that loaded
    assert len(inference["load_failures"]) == 1 and "summary" not in result
    assert "predict() answers: %d, of which 0 fallbacks" % n_test in (tmp_path / "o" / "train_log.txt").read_text()


def test_the_summary_counts_fallbacks_when_nothing_loads(tmp_path, tiny_data, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "artifacts.json").write_text(json.dumps({"classes": list(ti.GESTURES), "families": {}}))
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    result = ti.main(["--infer-only", "--model-dir", str(tmp_path / "m"), "--data-dir", str(tiny_data),
                      "--output-dir", str(tmp_path / "o")])
    inference = result["inference"]
    assert inference["fallbacks"] == inference["answers"] > 0 and inference["by_family"] == {}
    assert "EVERY answer will be" in (tmp_path / "o" / "train_log.txt").read_text()
    # No artifacts at all: the rerun still answers (the fallback, loudly); an interactive run stops.
    result = ti.main(["--infer-only", "--model-dir", str(tmp_path / "empty"), "--data-dir", str(tiny_data),
                      "--output-dir", str(tmp_path / "o2")])
    assert result["inference"]["fallbacks"] == result["inference"]["answers"] > 0
    assert "no artifacts.json" in "\n".join(_errors_logged(tmp_path / "o2"))
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN")
    with pytest.raises(SystemExit, match="no artifacts.json"):
        ti.main(["--infer-only", "--model-dir", str(tmp_path / "empty"), "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "o3")])


def test_imu_only_sequences_are_routed_to_imu_models(predictor, tiny_data):
    routes = {}
    for _, sequence, demo in _test_sequences(tiny_data)[:40]:
        imu_only = sequence.select(pl.col("thm_1").is_null().all()).item()
        routes[imu_only] = predictor.predict_proba(sequence, demo)[1]
    assert routes == {True: "imu", False: "full"}


def _one(tiny_data, full_sensor=True):
    for _, sequence, demo in _test_sequences(tiny_data):
        if sequence["thm_1"].is_not_null().any() == full_sensor:
            return sequence, demo
    raise AssertionError("no such sequence")


BAD_INPUTS = {
    "all thm/tof null": (lambda s, d: (s.with_columns([pl.lit(None, pl.Float64).alias(c)
                                                       for c in ti.THM_COLUMNS + ti.TOF_COLUMNS]), d), "imu_only"),
    "all rot null": (lambda s, d: (s.with_columns([pl.lit(None, pl.Float64).alias(c)
                                                   for c in ("rot_w", "rot_x", "rot_y", "rot_z")]), d), "no_rotation"),
    "NaN and inf values": (lambda s, d: (s.with_columns(pl.lit(float("nan")).alias("acc_x"),
                                                        pl.lit(float("inf")).alias("thm_2")), d), "non_finite"),
    "1-row sequence": (lambda s, d: (s.head(1), d), "length"),
    "1,000-row sequence": (lambda s, d: (pl.concat([s] * (1000 // s.height + 1)).head(1000).with_columns(
        pl.int_range(1000).alias("sequence_counter")), d), "length"),
    "columns in another order": (lambda s, d: (s.select(list(reversed(s.columns))), d), "column_order"),
    "extra columns": (lambda s, d: (s.with_columns(pl.lit(1).alias("battery")), d), "extra_columns"),
    "missing sensor column": (lambda s, d: (s.drop("tof_3_v12", "acc_y"), d), "missing_columns"),
    "empty demographics": (lambda s, d: (s, d.clear()), "demographics"),
    "missing demographics": (lambda s, d: (s, None), "demographics"),
    "unknown subject": (lambda s, d: (s.with_columns(pl.lit("SUBJ_999999").alias("subject")), d), "subject"),
    "strings in a sensor column": (lambda s, d: (s.with_columns(pl.lit("oops").alias("thm_4")), d), "non_finite"),
    "empty sequence": (lambda s, d: (s.clear(), d), "fallback"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_a_valid_gesture_and_a_warning(case, trained_run, tiny_data, warnings_seen):
    ti.configure_inference(trained_run[0])
    make, kind = BAD_INPUTS[case]
    sequence, demo = make(*_one(tiny_data))
    answer = ti.predict(sequence, demo)
    assert answer in ti.GESTURES
    assert ti._PREDICTOR_STATE["warnings"].counts.get(kind, 0) >= 1, warnings_seen.text
    assert any(r.levelname == "WARNING" for r in warnings_seen.records)
    ti.configure_inference(None)


def test_unusable_model_folder_falls_back_with_a_warning(tmp_path, tiny_data, warnings_seen):
    ti.configure_inference(tmp_path)                       # no artifacts here
    sequence, demo = _one(tiny_data)
    assert ti.predict(sequence, demo) == ti.DEFAULT_GESTURE
    assert ti.predict(sequence, demo) == ti.DEFAULT_GESTURE
    assert ti._PREDICTOR_STATE["warnings"].counts["fallback"] == 2
    assert "no artifacts.json" in warnings_seen.text
    ti.configure_inference(None)


def test_a_broken_family_is_skipped_not_fatal(trained_run, tmp_path, tiny_data, warnings_seen):
    out = copy_artifacts(trained_run[0], tmp_path / "copy")
    (out / "models" / "lgbm_full_fold1.txt").write_text("not a model")
    ti.configure_inference(out)
    sequence, demo = _one(tiny_data, full_sensor=True)
    assert ti.predict(sequence, demo) in ti.GESTURES
    assert ti._get_predictor().route(ti.sensor_matrix(sequence)) == "imu"   # full family failed to load
    assert "lgbm/full could not be loaded" in warnings_seen.text and "lgbm_full_fold1.txt" in warnings_seen.text
    ti.configure_inference(None)


@pytest.mark.skipif(not (REAL_DIR / "test.csv").exists(), reason="shared/cmi_real is absent")
def test_real_test_sequences_get_valid_gestures(predictor):
    test = pl.read_csv(REAL_DIR / "test.csv")               # read as the gateway would
    demographics = pl.read_csv(REAL_DIR / "test_demographics.csv")
    answers = []
    for _, sequence, demo in ti._gateway_sequences(test, demographics, seed=0):
        probs, route = predictor.predict_proba(sequence, demo)
        assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0, abs=1e-6)
        assert route == "full"
        answers.append(ti.predict(sequence, demo))
    assert len(answers) == 2 and all(a in ti.GESTURES for a in answers)


def test_pandas_input_goes_through_one_door_to_every_step(trained_run, tiny_data, monkeypatch, warnings_seen):
    """A notebook user's pandas frames (ids as integers, columns in another order) are converted once at
    predict()'s door: the demographics row is read (mirroring, LightGBM's demographic columns), the per-subject
    assignment runs, and every probability equals the polars call's."""
    monkeypatch.setenv("ENSEMBLE_PER_SUBJECT", "1")
    sequences = [(s, d) for _, s, d in _test_sequences(tiny_data)[:8]]
    answers, histories = {}, {}
    for kind in ("polars", "pandas"):
        ti.configure_inference(trained_run[0])
        for sequence, demo in sequences:
            if kind == "pandas":
                sequence = sequence.select(list(reversed(sequence.columns))).to_pandas()
                demo = demo.to_pandas()
                sequence["subject"] = sequence["subject"].str[5:].astype(int)   # SUBJ_012345 -> 12345
                demo["subject"] = demo["subject"].str[5:].astype(int)
            answers.setdefault(kind, []).append(ti.predict(sequence, demo))
        histories[kind] = {s: np.vstack(rows) for s, rows in ti._get_predictor().assigner.history.items()}
        counts = ti._PREDICTOR_STATE["warnings"].counts
        assert counts.get("fallback", 0) == counts.get("per_subject", 0) == counts.get("demographics", 0) == 0
    assert counts["input_type"] == 2 * len(sequences)       # both frames of every call converted, and said
    assert answers["pandas"] == answers["polars"]
    assert len(histories["pandas"]) == len(histories["polars"]) and sum(map(len, histories["polars"].values())) == 8
    for subject, rows in histories["polars"].items():
        np.testing.assert_allclose(histories["pandas"][str(int(subject[5:]))], rows, atol=1e-12)
    ti.configure_inference(None)


def test_settings_the_saved_models_override_are_logged_once(trained_run, tiny_data, monkeypatch, warnings_seen):
    """Mirroring and the decoding come from the models' manifest at inference: set differently now, each is
    logged as overridden once per load, not per answer, and predict() keeps the models' setting."""
    sequence, demo = _one(tiny_data)
    monkeypatch.setenv("CMI_MIRROR_LEFT_HANDED", "0")
    monkeypatch.setenv("ENSEMBLE_DECODING", "nine_way")
    ti.configure_inference(trained_run[0])
    for _ in range(3):
        ti.predict(sequence, demo)
    predictor = ti._get_predictor()
    assert predictor.mirror is True and predictor.decoding == "argmax"
    assert warnings_seen.text.count("CMI_MIRROR_LEFT_HANDED=0 is set, but the saved models were trained with true") == 1
    assert warnings_seen.text.count("ENSEMBLE_DECODING=nine_way is set") == 1
    warnings_seen.clear()
    monkeypatch.setenv("CMI_MIRROR_LEFT_HANDED", "1")          # the models' own values, or auto: nothing to say
    monkeypatch.setenv("ENSEMBLE_DECODING", "auto")
    ti.configure_inference(trained_run[0])
    ti.predict(sequence, demo)
    assert "is set, but the saved models" not in warnings_seen.text
    ti.configure_inference(None)
