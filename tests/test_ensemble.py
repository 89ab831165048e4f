"""Ensemble and inference: the fast metric, the weight search and its guard, failed families, per-subject
assignment across calls, and the training summary."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import train_infer as ti
from conftest import script_env


def test_fast_score_equals_the_official_metric():
    rng = np.random.default_rng(0)
    for n, classes in [(50, 18), (200, 18), (30, 5), (40, 12), (1, 18)]:
        labels = rng.integers(0, classes, n)
        predicted = rng.integers(0, classes, n)
        exact = ti.competition_score([ti.GESTURES[i] for i in labels], [ti.GESTURES[i] for i in predicted])
        assert ti.fast_competition_score(labels, predicted) == pytest.approx(exact.score, abs=1e-12)
    only_non_targets = np.array([9, 10, 11])
    names = [ti.GESTURES[i] for i in only_non_targets]
    assert ti.fast_competition_score(only_non_targets, only_non_targets) == pytest.approx(
        ti.competition_score(names, names).score)


def _good_and_overconfident(n=600, seed=0):
    """Family A is right 80% of the time with moderate confidence; family B is noise, but confident noise:
    with equal weights B's 0.95 outvotes A's 0.5, so the right weights (mostly A) score much higher."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 18, n)
    a = np.full((n, 18), 0.5 / 17)
    a[np.arange(n), np.where(rng.random(n) < 0.8, y, rng.integers(0, 18, n))] = 0.5
    b = np.full((n, 18), 0.05 / 17)
    b[np.arange(n), rng.integers(0, 18, n)] = 0.95
    return np.stack([a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)]), y


def test_weight_search_beats_or_equals_equal_weights_and_is_deterministic():
    probs, y = _good_and_overconfident()
    equal = ti.fast_competition_score(y, probs.mean(0).argmax(1))
    weights, score = ti.optimize_ensemble_weights(probs, y, trials=256, seed=1)
    assert score >= equal and score > equal + 0.01
    assert weights.sum() == pytest.approx(1.0) and weights[0] > weights[1]
    again, again_score = ti.optimize_ensemble_weights(probs, y, trials=256, seed=1)
    np.testing.assert_array_equal(weights, again)
    assert again_score == score
    one = probs[:1]                                         # a single family: weight 1, its own score
    w1, s1 = ti.optimize_ensemble_weights(one, y, trials=16)
    assert w1.tolist() == [1.0] and s1 == pytest.approx(ti.fast_competition_score(y, one[0].argmax(1)))


def _result(family, probs, variant="imu"):
    return ti.FamilyResult(family, variant, [], [], probs, np.ones(len(probs), bool), [{"best_iteration": 1}], 0.0,
                           None)


def test_route_ensemble_uses_searched_weights_only_when_they_hold_out_of_fold():
    probs, y = _good_and_overconfident(n=900)
    folds = np.arange(len(y)) % 3
    ensemble, _ = ti.build_route_ensemble("imu", [_result("a", probs[0]), _result("b", probs[1])], y, folds, 128, 0)
    assert ensemble.used == "searched" and ensemble.nested_score > ensemble.equal_score
    assert ensemble.searched_score >= ensemble.nested_score - 1e-9     # in-sample is the optimistic one
    rng = np.random.default_rng(5)
    noise = [_result(f, rng.dirichlet(np.ones(18), len(y))) for f in ("x", "y", "z")]
    guarded, honest_blend = ti.build_route_ensemble("imu", noise, y, folds, 128, 0)
    if guarded.used == "equal":                             # the guard fell back: weights are equal
        assert guarded.weights == pytest.approx([1 / 3] * 3, abs=1e-6)
    assert guarded.honest.score == pytest.approx(
        guarded.nested_score if guarded.used == "searched" else guarded.equal_score)
    assert guarded.honest.score == pytest.approx(ti.fast_competition_score(y, honest_blend.argmax(1)))


def _one_target_or_ten_non_targets():
    """A target at 0.25 against ten non-targets at 0.075 each (0.75 together): 18-way argmax says the target."""
    row = np.full(18, 0.075)
    row[:ti.N_TARGETS] = 0.0
    row[3] = 0.25
    row[ti.N_TARGETS + 2] = 0.08                             # the most likely single non-target
    return row / row.sum()


def test_nine_way_decoding_answers_non_target_when_the_non_targets_together_are_more_likely():
    row = _one_target_or_ten_non_targets()
    assert row.argmax() == 3                                  # the 18-way argmax picks the target
    assert ti.decide_gestures(row[None], "argmax")[0] == 3
    assert ti.decide_gestures(row[None], "nine_way")[0] == ti.N_TARGETS + 2
    # the metric agrees: truth non-target, so the target answer costs binary and macro F1
    y = np.array([ti.N_TARGETS + 5, 0])
    other = np.zeros(18)
    other[0] = 1.0
    probs = np.vstack([row, other])
    assert ti.fast_competition_score(y, ti.decide_gestures(probs, "nine_way")) > \
        ti.fast_competition_score(y, ti.decide_gestures(probs, "argmax"))
    confident = np.full(18, 0.01)
    confident[5] = 0.83                                      # a clear target stays a target either way
    assert ti.decide_gestures(confident[None], "nine_way")[0] == 5
    assert ti.decide_gestures(row[None], "nine_way", open_buckets=np.arange(9) < ti.N_TARGETS)[0] == 3


def test_weight_search_optimises_the_decoding_it_is_given():
    rng = np.random.default_rng(3)
    n = 400
    y = np.where(rng.random(n) < 0.5, 3, ti.N_TARGETS + rng.integers(0, 10, n))
    # Family a spreads non-target sequences over the ten non-targets (argmax then says target 3); family b
    # is a weak, confident guesser. Under nine_way decoding a alone is right; under argmax it is not.
    a = np.tile(_one_target_or_ten_non_targets(), (n, 1))
    a[y == 3, 3] = 0.9
    a /= a.sum(1, keepdims=True)
    b = rng.dirichlet(np.full(18, 0.3), n)
    probs = np.stack([a, b])
    w_nine, s_nine = ti.optimize_ensemble_weights(probs, y, trials=64, seed=0, decoding="nine_way")
    assert s_nine == pytest.approx(ti.fast_competition_score(y, ti.decide_gestures(ti.blend(probs, w_nine),
                                                                                   "nine_way")))
    assert s_nine > ti.optimize_ensemble_weights(probs, y, trials=64, seed=0, decoding="argmax")[1]


def test_assignment_respects_the_capacity_and_is_the_plain_decision_when_nothing_binds():
    capacity = np.full(9, 2)
    capacity[0] = 1
    history = np.full((1, 18), 0.01)
    history[0, 0], history[0, 1] = 0.6, 0.3
    assert ti.assign_within_subject(history, capacity, "argmax") == 0
    # A second sequence that also looks like gesture 0, but less so: gesture 0 has room for one.
    second = np.full(18, 0.01)
    second[0], second[2] = 0.5, 0.4
    assert ti.assign_within_subject(np.vstack([history, second]), capacity, "argmax") == 2
    many = np.tile(history, (40, 1))                        # more sequences than all capacities: still an answer
    assert 0 <= ti.assign_within_subject(many, capacity, "argmax") < 18
    rng = np.random.default_rng(0)
    loose = rng.dirichlet(np.ones(18), 5)                   # capacity 8 everywhere, 5 rows: nothing binds
    for decoding in ti.DECODINGS:
        assert ti.assign_within_subject(loose, np.full(9, 8), decoding) == ti.decide_gestures(loose, decoding)[-1]


def test_the_pooled_bucket_never_turns_a_correct_non_target_answer_into_a_target():
    quota = {g: (1 if g in ti.NON_TARGET_GESTURES else 8) for g in ti.GESTURES}
    glasses = ti.GESTURES.index("Glasses on/off")
    looks_like_glasses = np.full(18, 0.02)
    looks_like_glasses[glasses], looks_like_glasses[4] = 0.5, 0.2   # second choice: a target
    assigner = ti.SubjectAssigner(quota, "argmax")
    answers = [assigner.answer("S1", looks_like_glasses) for _ in range(5)]
    # Glasses' own quota is 1, but the ten non-targets share 10 slots: every answer stays non-target.
    assert all(a >= ti.N_TARGETS for a in answers) and answers == [glasses] * 5
    capacity = ti.pooled_capacity(quota)
    assert capacity.tolist() == [8] * 8 + [10]


def test_answers_given_earlier_are_never_changed_and_state_is_per_subject():
    assigner = ti.SubjectAssigner({g: (1 if g == ti.GESTURES[0] else 3) for g in ti.GESTURES}, "argmax")
    looks_like_0 = np.full(18, 0.01)
    looks_like_0[0], looks_like_0[5] = 0.7, 0.2
    answers = [assigner.answer(s, looks_like_0) for s in ["S1", "S2", "S1", "S2", "S1"]]
    assert answers == [0, 0, 5, 5, 5]                       # each subject's quota of gesture 0 is its own
    assert assigner.answer(None, looks_like_0) == 0         # no subject id: the plain decision
    # The replay answers every row exactly once, in arrival order: a later, clearer gesture-0 sequence takes
    # the slot in the joint labelling, yet the first answer (0) stands; only the new row gets the other gesture.
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(18), 30)
    probs[:, 0] += 0.5
    probs /= probs.sum(1, keepdims=True)
    y = np.zeros(30, dtype=int)
    subjects = np.repeat([0, 1, 2], 10)
    capacity = np.full(9, 2)
    plain, assigned = ti.simulate_per_subject(
        probs, subjects, lambda rows: ti.assign_within_subject(probs[rows], capacity, "argmax"), 0, "argmax")
    order_rng = np.random.default_rng(0)
    for subject in range(3):
        order = order_rng.permutation(np.where(subjects == subject)[0])
        for i, row in enumerate(order):     # each answer is the one given when the row arrived
            assert assigned[row] == ti.assign_within_subject(probs[order[: i + 1]], capacity, "argmax")
        assert (assigned[order[:2]] == 0).all()                 # the first two arrivals fill gesture 0


def test_simulation_measures_a_gain_on_confusable_pairs():
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(6), 16)
    y = np.tile(np.repeat([0, 1], 8), 6)                    # each subject: 8 x gesture 0, 8 x gesture 1
    probs = np.full((len(y), 18), 0.001)
    probs[:, 0] = 0.5 + rng.normal(0, 0.02, len(y)) + 0.03 * (y == 0)   # the model leans to gesture 0 ...
    probs[:, 1] = 0.45 + 0.03 * (y == 1)                     # ... but ranks the sequences right
    plain, assigned = ti.simulate_per_subject(
        probs, subjects, lambda rows: ti.assign_within_subject(probs[rows], np.full(9, 8), "argmax"), 0, "argmax")
    assert ti.fast_competition_score(y, assigned) > ti.fast_competition_score(y, plain)
    assert ti.subject_bootstrap_spread(y, plain, plain, subjects, seed=0) == 0.0   # no change, no spread


def joint_sequences(rows: list[tuple[str, int, int]]) -> pl.DataFrame:
    """A sequence table (subject, gesture label, orientation label) as sequence_table() makes it."""
    return pl.DataFrame(rows, schema=["subject", "label", "orientation_label"], orient="row")


def test_joint_capacities_are_each_subjects_most_per_orientation_and_bucket_read_from_the_data():
    rows = ([("A", 0, 0)] * 2 + [("A", 0, 1)] * 2 + [("B", 0, 0)] * 3     # B did gesture 0 three times seated
            + [("A", 9, 2), ("A", 12, 2), ("A", 17, 2)]                    # non-targets pool per orientation
            + [("B", 3, -1)] * 5)                                          # no known orientation: not counted
    capacity = ti.joint_capacity(joint_sequences(rows))
    expected = np.zeros((4, 9), dtype=int)
    expected[0, 0], expected[1, 0], expected[2, 8] = 3, 2, 3
    assert capacity.tolist() == expected.tolist()


def test_the_joint_assignment_spends_each_orientations_slots_separately():
    capacity = np.zeros((4, 9), dtype=int)
    capacity[:, :8], capacity[:, 8] = 2, 10                # the protocol: each target twice per orientation
    looks_like_0 = np.full(18, 0.01)
    looks_like_0[0], looks_like_0[3] = 0.6, 0.3
    history = np.tile(looks_like_0, (3, 1))
    seated = np.tile(np.eye(4)[0] * 0.97 + 0.01, (3, 1))
    # Three sequences that look like gesture 0, all clearly seated: only two fit, the third takes gesture 3.
    assert ti.assign_jointly(history, seated, capacity, "argmax") == 3
    # The same three spread over two orientations fit: the third keeps gesture 0.
    spread = seated.copy()
    spread[2] = np.eye(4)[1] * 0.97 + 0.01
    assert ti.assign_jointly(history, spread, capacity, "argmax") == 0
    # Per gesture (8 slots) nothing binds: the pooled assignment keeps gesture 0 in both cases.
    assert ti.assign_within_subject(history, ti.pooled_capacity({g: 8 for g in ti.GESTURES}), "argmax") == 0
    assert ti.assign_jointly(history[:1], seated[:1], capacity, "argmax") == 0      # one row: the plain answer
    many = np.tile(looks_like_0, (120, 1))                 # more rows than all the slots: still an answer
    assert 0 <= ti.assign_jointly(many, np.tile(seated[:1], (120, 1)), capacity, "argmax") < 18


def test_the_assigner_is_joint_while_it_has_every_rows_orientation_and_pooled_otherwise():
    capacity = np.zeros((4, 9), dtype=int)
    capacity[:, :8], capacity[:, 8] = 2, 10
    looks_like_0 = np.full(18, 0.01)
    looks_like_0[0], looks_like_0[3] = 0.6, 0.3
    seated = np.eye(4)[0] * 0.97 + 0.01
    joint = ti.SubjectAssigner({g: 8 for g in ti.GESTURES}, "argmax", capacity)
    assert [joint.answer("S", looks_like_0, seated) for _ in range(3)] == [0, 0, 3]
    assert joint.answer("T", looks_like_0, None) == 0       # a row without orientation: per gesture
    assert [joint.answer("T", looks_like_0, seated) for _ in range(2)] == [0, 0]


def test_the_replay_measures_the_joint_assignment_and_picks_the_better_one():
    """Out-of-fold rows in which each subject's pairs of confusable gestures are told apart by orientation:
    the joint assignment gains more than the pooled one (8 per gesture); auto picks joint; pooled forced stays
    pooled; without orientation probabilities there is no joint candidate."""
    rng = np.random.default_rng(0)
    rows, probs, orientation = [], [], []
    for subject in range(8):
        for o in range(4):
            for gesture in (0, 1):
                for _ in range(2):
                    rows.append((f"S{subject}", gesture, o, True))
                    p = np.full(18, 0.001)
                    p[0], p[1] = 0.5 + rng.normal(0, 0.02), 0.45     # leans to 0 whatever the truth
                    p[gesture] += 0.03
                    probs.append(p / p.sum())
                    orientation.append(np.eye(4)[o] * 0.9 + 0.025)
    sequences = pl.DataFrame(rows, schema=["subject", "label", "orientation_label", "has_thm_tof"], orient="row"
                             ).with_columns(pl.col("label").map_elements(ti.GESTURES.__getitem__, pl.String).alias("gesture"))
    probs, orientation = np.array(probs), np.array(orientation)
    result = ti.FamilyResult("lgbm", "full", [], [], probs, np.ones(len(probs), bool), [], 0.0)
    ensembles = {"full": ti.RouteEnsemble("full", ["lgbm"], [1.0], {}, 0, 0, 0, "equal")}
    model = {"oof": orientation}
    auto = ti.evaluate_per_subject(ensembles, [result], sequences, None, "argmax", 0, "auto", model)
    assert auto["assignment"] == "joint" and auto["enabled"]
    assert auto["gains"]["joint"] > auto["gains"]["pooled"] + 0.01 and auto["orientation_accuracy"] == 1.0
    pooled = ti.evaluate_per_subject(ensembles, [result], sequences, None, "argmax", 0, "pooled", model)
    assert pooled["assignment"] == "pooled" and set(pooled["gains"]) == {"pooled"}
    blind = ti.evaluate_per_subject(ensembles, [result], sequences, None, "argmax", 0, "joint", None)
    assert blind["assignment"] == "pooled" and blind["orientation_source"] == "none"


def test_a_family_that_fails_at_predict_time_is_left_out(all_families_run, tiny_data, monkeypatch, warnings_seen):
    ti.configure_inference(all_families_run[0])
    predictor = ti._get_predictor()
    keras_family = dict(predictor.models["full"])["keras"]

    def broken(inputs):
        raise RuntimeError("GPU fell off the bus (injected)")

    monkeypatch.setattr(keras_family, "predict", broken)
    test = pl.read_csv(tiny_data / "test.csv")
    demographics = pl.read_csv(tiny_data / "test_demographics.csv")
    answered = [ti.predict(seq, demo) for _, seq, demo in list(ti._gateway_sequences(test, demographics, 2))[:20]]
    assert set(answered) <= set(ti.GESTURES)
    counts = ti._PREDICTOR_STATE["warnings"].counts
    assert counts.get("family_keras", 0) > 0 and counts.get("fallback", 0) == 0
    assert "left out" in warnings_seen.text
    ti.configure_inference(None)


def test_training_summary_and_ensemble_artifacts(all_families_run):
    out, result = all_families_run
    summary = pl.read_csv(out / "summary.csv")
    assert {("ensemble", "imu"), ("ensemble", "full"), ("ensemble", "mixed"), ("per-subject", "mixed")} <= set(
        zip(summary["family"], summary["route"]))
    assert {"oof_score", "binary_f1", "macro_f1", "mean_best_iteration", "train_seconds", "note"} <= set(summary.columns)
    manifest = json.loads((out / "artifacts.json").read_text())
    for route in ("imu", "full"):
        ensemble = manifest["ensemble"][route]
        assert ensemble["families"] == ["lgbm", "torch", "keras"]
        assert sum(ensemble["weights"]) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(manifest["per_subject"]["enabled"], bool) and manifest["per_subject"]["quota"]
    assert manifest["decoding"] in ti.DECODINGS and set(manifest["decoding_scores"]) == set(ti.DECODINGS)
    assert manifest["per_subject"]["noise"] >= 0 and manifest["per_subject"]["decoding"] == manifest["decoding"]
    confusion = pl.read_csv(out / "confusion_matrix.csv")
    assert confusion.height == 18 and confusion.drop("true_gesture").sum().sum_horizontal()[0] == \
        manifest["per_subject"]["n_scored"]


def test_the_default_run_answers_every_test_sequence_with_every_family(all_families_run, tiny_data):
    out, result = all_families_run
    submission = pl.read_csv(out / "submission.csv")
    test_ids = pl.read_csv(tiny_data / "test.csv")["sequence_id"].unique().sort()
    assert submission["sequence_id"].sort().equals(test_ids)
    assert submission["gesture"].is_in(ti.GESTURES).all()
    warnings = result["inference"]["warnings"]
    assert not [kind for kind in warnings if kind == "fallback" or kind.startswith("family_")], warnings
    assert sorted(p.name.split("_fold")[0] for p in (out / "models").iterdir() if "_fold0" in p.name) == [
        "keras_full", "keras_imu", "lgbm_full", "lgbm_imu", "torch_full", "torch_imu"]


def test_end_to_end_bench_reports_stages_and_the_ensemble_against_the_best_family(all_families_run, capsys):
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_end_to_end.py"
    spec = importlib.util.spec_from_file_location("bench_end_to_end", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = json.loads((all_families_run[0] / "run_summary.json").read_text())
    bench.print_report(summary, None, None)
    printed = capsys.readouterr().out
    for stage in ("lgbm imu", "torch full", "keras imu", "ensemble", "inference"):
        assert f"| {stage} |" in printed
    for route in ("imu", "full"):
        assert f"route {route}: ensemble " in printed and "best single family" in printed
    assert "p50" in printed


def test_per_subject_state_is_reset_between_runs(all_families_run, tiny_data, monkeypatch):
    monkeypatch.setenv("ENSEMBLE_PER_SUBJECT", "1")
    ti.configure_inference(all_families_run[0])
    first = ti._get_predictor()
    test = pl.read_csv(tiny_data / "test.csv")
    demographics = pl.read_csv(tiny_data / "test_demographics.csv")
    for _, seq, demo in list(ti._gateway_sequences(test, demographics, 4))[:8]:
        assert ti.predict(seq, demo) in ti.GESTURES
    assert sum(len(v) for v in first.assigner.history.values()) == 8
    ti.configure_inference(all_families_run[0])             # a new run: a new predictor, empty state
    assert ti._get_predictor().assigner.history == {}
    ti.configure_inference(None)


def test_a_family_that_fails_to_train_is_left_out(tiny_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA driver too old (injected)")

    monkeypatch.setattr(ti, "train_torch", broken)
    with script_env(RUN_KERAS_TRAINING="0", LGBM_N_ESTIMATORS="20", LGBM_ES_ROUNDS="5", ENSEMBLE_TRIALS="16"):
        result = ti.main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--folds", "2"])
    assert [f["family"] for f in result["failed_families"]] == ["torch", "torch"]
    manifest = json.loads((tmp_path / "artifacts.json").read_text())
    assert set(manifest["families"]) == {"lgbm"}
    log = (tmp_path / "train_log.txt").read_text()
    assert "torch imu failed to train" in log and "CUDA driver too old (injected)" in log
    assert result["inference"]["warnings"].get("fallback", 0) == 0


def test_the_default_run_builds_the_deep_arrays_once_and_no_fold_reads_a_frame(all_families_run):
    log = (all_families_run[0] / "train_log.txt").read_text()
    built = [line for line in log.splitlines() if "built once" in line]
    assert len(built) == 2 and all("hit rate 100.0%" in line for line in built)   # imu and full, pad 90, shared
    assert "Frame access by the deep folds after the arrays were built: 0 lookups" in log
    assert "frame features (one pass over the table) done" in log and "frame + aggregate" not in log
