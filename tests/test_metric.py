"""The official metric, re-implemented, against cases computed by hand; folds grouped by subject."""
import numpy as np
import polars as pl
import pytest

import train_infer as ti

T1, T2 = "Cheek - pinch skin", "Neck - scratch"            # target (BFRB) gestures
N1, N2 = "Wave hello", "Text on phone"                     # non-target gestures


def test_perfect_prediction_scores_one():
    s = ti.competition_score([T1, T2, N1], [T1, T2, N1])
    assert (s.score, s.binary_f1, s.macro_f1) == (1.0, 1.0, 1.0)


def test_hand_computed_case():
    # binary: truth 1,1,1,0,0 vs 1,1,1,0,1 -> TP 3, FP 1, FN 0 -> F1 = 6/7
    # macro over {T1, T2, non_target}: T1 P=.5 R=.5 -> .5; T2 P=.5 R=1 -> 2/3; non_target P=1 R=.5 -> 2/3
    s = ti.competition_score([T1, T1, T2, N1, N2], [T1, T2, T2, N2, T1])
    assert s.binary_f1 == pytest.approx(6 / 7)
    assert s.macro_f1 == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert s.score == pytest.approx(0.5 * 6 / 7 + 0.5 * (0.5 + 2 / 3 + 2 / 3) / 3)


def test_non_target_gestures_are_one_class():
    assert ti.competition_score([N1, T1], [N2, T1]).score == 1.0


def test_label_only_in_predictions_counts_in_macro():
    s = ti.competition_score([T1, T1], [T1, T2])
    assert s.binary_f1 == 1.0
    assert s.macro_f1 == pytest.approx((2 / 3 + 0.0) / 2)


def test_no_target_anywhere_gives_zero_binary():
    s = ti.competition_score([N1, N2], [N2, N1])
    assert (s.binary_f1, s.macro_f1, s.score) == (0.0, 1.0, 0.5)


def test_gesture_outside_the_18_raises():
    with pytest.raises(ValueError, match="outside the 18"):
        ti.competition_score([T1], ["Juggling"])


def test_score_probabilities_uses_argmax():
    probs = np.zeros((2, 18))
    probs[0, ti.GESTURE_TO_INDEX[T1]] = 1
    probs[1, ti.GESTURE_TO_INDEX[N1]] = 1
    labels = np.array([ti.GESTURE_TO_INDEX[T1], ti.GESTURE_TO_INDEX[N1]])
    assert ti.score_probabilities(labels, probs).score == 1.0


def _sequences(n_subjects=6, per_subject=36):
    rows = [(f"SEQ_{s:03d}{i:03d}", f"SUBJ_{s:06d}", i % 18) for s in range(n_subjects) for i in range(per_subject)]
    return pl.DataFrame(rows, schema=["sequence_id", "subject", "label"], orient="row")


def test_folds_group_subjects_and_are_deterministic():
    seqs = _sequences()
    folds = ti.make_folds(seqs, 3, seed=1)
    assert set(folds) == {0, 1, 2}
    by_subject = seqs.with_columns(pl.Series("fold", folds)).group_by("subject").agg(pl.col("fold").n_unique())
    assert by_subject["fold"].max() == 1                   # no subject in two folds
    assert np.array_equal(folds, ti.make_folds(seqs, 3, seed=1))


def test_too_few_subjects_for_folds_is_a_clear_error():
    with pytest.raises(ti.ConfigError, match="only 2 subjects"):
        ti.make_folds(_sequences(n_subjects=2), 5, seed=1)
