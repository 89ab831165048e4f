"""Devices worn turned 180 degrees about z: the generator's turned subjects, the detector in training (found,
turned back, no false finds) and in predict() (decided per subject, turned back, logged once); the orientation
classifier that the joint assignment reads, from raw rows as in training."""
import json

import numpy as np
import polars as pl

import train_infer as ti


def test_the_generator_turns_a_subjects_device_physically_and_says_who(tmp_path, monkeypatch):
    """The same set generated with every subject turned is, turned back, the set with none: the turn is
    applied to the raw signals where the mirror is, and nothing else is drawn differently. Only which sensor
    a lost reading belongs to moves: the generator loses the device's 5th sensor, which a turned device
    wears where the 3rd sits."""
    monkeypatch.setattr(ti, "TURNED_DEVICE_RATE", 0.0)
    usual = ti.generate_synthetic_competition_data(tmp_path / "usual", 2, 1, seed=5)
    monkeypatch.setattr(ti, "TURNED_DEVICE_RATE", 1.0)
    turned = ti.generate_synthetic_competition_data(tmp_path / "turned", 2, 1, seed=5)
    subjects = json.loads((turned / "synthetic_manifest.json").read_text())["turned_subjects"]
    assert len(subjects) == 3 and json.loads((usual / "synthetic_manifest.json").read_text())["turned_subjects"] == []
    assert pl.read_csv(turned / "test_labels.csv")["device_turned"].all()
    for name, columns in (("train.csv", ti.TRAIN_COLUMNS), ("test.csv", ti.TEST_COLUMNS)):
        a = ti.read_competition_csv(usual / name, columns)
        b = ti.read_competition_csv(turned / name, columns)
        assert not a.equals(b)
        back = ti.turn_subjects_back(b, subjects)
        assert back.drop(ti.SENSOR_COLUMNS).equals(a.drop(ti.SENSOR_COLUMNS))
        x, y = ti.sensor_matrix(a), ti.sensor_matrix(back)
        both = np.isfinite(x) & np.isfinite(y)
        assert np.array_equal(x[both], y[both]) and np.isnan(x).sum() == np.isnan(y).sum()
        assert both.mean() > 0.3


def _one_subject_turned(train: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    subject = sorted(train["subject"].unique().to_list())[1]
    return ti.turn_subjects_back(train, [subject]), subject      # the turn is its own inverse


def test_training_finds_the_turned_subject_turns_it_back_and_finds_none_in_a_set_without(tiny_data):
    train = ti.load_train_data(tiny_data)
    fixed, record = ti.find_turned_devices(train, True)
    assert record["found"] == {} and fixed.equals(train)         # no subject of the set is turned
    assert record["highest_other"] < -ti.TURN_DECISION
    turned, subject = _one_subject_turned(train)
    fixed, record = ti.find_turned_devices(turned, True)
    assert list(record["found"]) == [subject] and record["found"][subject] > ti.TURN_DECISION
    assert fixed.equals(train)                                   # turned back, row for row
    detector = ti.TurnDetector.from_dict(record["detector"])
    table = ti.training_start_directions(train, True)
    evidence = detector.evidence(table.select("dx", "dy", "dz").to_numpy())
    mine = (table["subject"] == subject).to_numpy()
    assert (evidence[mine] < 0).mean() > 0.7                     # the refit reads the fixed subject as usual
    # The detector's turn is the raw turn: the start directions of the whole table turned are its own, turned.
    everyone = ti.training_start_directions(ti.turn_subjects_back(train, train["subject"].unique()), True)
    directions = table.select("dx", "dy", "dz").to_numpy()
    assert np.allclose(everyone.select("dx", "dy", "dz").to_numpy(), directions * ti.TURN_AXES, atol=1e-6)
    assert np.allclose(detector.evidence(directions * ti.TURN_AXES), -detector.evidence(directions))


def _gateway(tiny_data, turn: set[str]):
    """The tiny test set's sequences, subject by subject in a fixed order, those of ``turn`` turned."""
    test = ti.read_competition_csv(tiny_data / "test.csv", ti.TEST_COLUMNS)
    test = ti.turn_subjects_back(test, turn)
    demographics = pl.read_csv(tiny_data / "test_demographics.csv", schema_overrides={"subject": pl.String})
    for _, sequence in test.group_by("sequence_id", maintain_order=True):
        yield sequence, demographics.filter(pl.col("subject") == sequence["subject"][0])


def test_predict_decides_per_subject_turns_back_and_logs_once(trained_run, tiny_data, warnings_seen):
    subjects = sorted(pl.read_csv(tiny_data / "test_demographics.csv")["subject"].cast(pl.String).to_list())
    turned = subjects[0]
    ti.configure_inference(trained_run[0])
    try:
        usual = ti._get_predictor()
        assert usual.turns is not None
        plain = [usual.predict_sequence(s, d).probs for s, d in _gateway(tiny_data, set())]
        assert usual.turns.turned_subjects() == []              # no false flip on a set without
        ti.configure_inference(trained_run[0])
        predictor = ti._get_predictor()
        answers = [predictor.predict_sequence(s, d).probs for s, d in _gateway(tiny_data, {turned})]
        assert predictor.turns.turned_subjects() == [turned]
        assert ti.answer_counts()["turned_subjects"] == [turned]
    finally:
        ti.configure_inference(None)
    ids = [s["subject"][0] for s, _ in _gateway(tiny_data, set())]
    mine = [i for i, s in enumerate(ids) if s == turned]
    decided = predictor.turns.evidence[turned]
    assert decided[0] > ti.TURN_DECISION and decided[1] == len(mine)
    # Once the subject's evidence is clear (a handful of sequences), each of its sequences is turned back and
    # answered exactly as if it had been worn the usual way; the other subject is untouched throughout.
    assert all(np.allclose(answers[i], plain[i]) for i in mine[8:])
    assert not np.allclose(answers[mine[0]], plain[mine[0]])
    assert all(np.allclose(answers[i], plain[i]) for i in range(len(ids)) if ids[i] != turned)
    decisions = [r.getMessage() for r in warnings_seen.records if "wears the device" in r.getMessage()]
    mentions = [m for m in decisions if turned in m]
    assert len(mentions) == 2                                    # once per predictor: as usual, then turned
    assert "the usual way" in mentions[0] and "turned 180 degrees" in mentions[1]


def test_predict_never_turns_with_the_detector_switched_off(trained_run, tiny_data, monkeypatch):
    monkeypatch.setenv("TURNED_DEVICES", "0")
    ti.configure_inference(trained_run[0])
    try:
        assert ti._get_predictor().turns is None
    finally:
        ti.configure_inference(None)


def test_the_orientation_classifier_answers_from_raw_rows_as_in_training(trained_run, tiny_data):
    import lightgbm as lgb
    out = trained_run[0]
    per_subject = json.loads((out / ti.ARTIFACT_MANIFEST).read_text())["per_subject"]
    assert per_subject["assignment"] == "joint" and per_subject["enabled"]         # forced by the fixture
    spec = per_subject["orientation_model"]
    booster = lgb.Booster(model_file=str(out / spec["path"]))
    train = ti.load_train_data(tiny_data)
    features = ti.build_feature_table(train, True)
    expected = booster.predict(features.select(spec["features"]).to_numpy().astype(np.float32))
    demographics = pl.read_csv(tiny_data / "train_demographics.csv", schema_overrides={"subject": pl.String})
    ti.configure_inference(out)
    try:
        predictor = ti._get_predictor()
        assert predictor.orientation_model is not None and predictor.assigner.joint is not None
        for i, (_, sequence) in enumerate(train.group_by("sequence_id", maintain_order=True)):
            if i == 12:
                break
            row = demographics.filter(pl.col("subject") == sequence["subject"][0])
            got = predictor.predict_sequence(sequence.select(ti.TEST_COLUMNS), row).orientation
            assert features["sequence_id"][i] == sequence["sequence_id"][0]
            assert np.allclose(got, expected[i], atol=1e-5)
    finally:
        ti.configure_inference(None)
