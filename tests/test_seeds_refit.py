"""Several seeds per fold and the full-data refit: saved, reloaded and used by predict(); out-of-fold rows
average the seeds; the refit never has out-of-fold rows."""
import json

import numpy as np
import polars as pl
import pytest

import train_infer as ti
from conftest import script_env


@pytest.fixture(scope="module")
def seeds_refit_run(tiny_data, tmp_path_factory):
    """Every family, two folds, two seeds per deep model, the full-data refit on: 1 epoch, small trees; the
    orientation head on, so that its probabilities are averaged like the gestures'."""
    out = tmp_path_factory.mktemp("seeds_refit")
    with script_env(DL_EPOCHS="1", KERAS_EPOCHS="1", DL_BATCH_SIZE="64", KERAS_BATCH_SIZE="64", DL_SEEDS="2",
                    AUX_ORIENTATION_WEIGHT="0.5",
                    KERAS_SEEDS="2", FULL_FIT="1", LGBM_N_ESTIMATORS="20", LGBM_ES_ROUNDS="5", ENSEMBLE_TRIALS="16"):
        result = ti.main(["--data-dir", str(tiny_data), "--output-dir", str(out), "--folds", "2"])
    return out, result, ti._get_predictor()                 # the run's own loaded models, as predict() used them


def test_every_seed_and_refit_model_is_saved_and_listed(seeds_refit_run):
    out, result, _ = seeds_refit_run
    manifest = json.loads((out / "artifacts.json").read_text())
    for family, ext in (("torch", "pt"), ("keras", "keras")):
        for variant in ti.VARIANTS:
            spec = manifest["families"][family][variant]
            assert spec["models"] == [f"models/{family}_{variant}_fold{f}{s}.{ext}" for f in (0, 1)
                                      for s in ("", "_seed1")]
            assert spec["refit_models"] == [f"models/{family}_{variant}_full.{ext}",
                                            f"models/{family}_{variant}_full_seed1.{ext}"]
    for variant in ti.VARIANTS:
        assert manifest["families"]["lgbm"][variant]["refit_models"] == [f"models/lgbm_{variant}_full.txt"]
    listed = {p for fam in manifest["families"].values() for spec in fam.values()
              for p in spec["models"] + spec["refit_models"]}
    assert all((out / p).is_file() for p in listed)
    epochs = pl.read_csv(out / "epoch_log.csv")
    assert set(epochs["seed"].unique()) == {0, 1}
    refit_rows = epochs.filter(pl.col("fold") == -1)       # the refit: trained, never scored on out-of-fold rows
    assert refit_rows.height == 2 * 2 * 2 and refit_rows["score"].null_count() == refit_rows.height
    assert result["inference"]["warnings"].get("fallback", 0) == 0


def test_predict_uses_fold_models_and_refits_half_and_half(seeds_refit_run, tiny_data):
    out, _, predictor = seeds_refit_run
    assert predictor.model_dir == out
    families = dict(predictor.models["full"])
    assert len(families["torch"].models) == 6 and len(families["lgbm"].models) == 3
    np.testing.assert_allclose(families["torch"].weights, [0.125] * 4 + [0.25] * 2)
    np.testing.assert_allclose(families["lgbm"].weights, [0.25, 0.25, 0.5])
    assert len(families["keras"].models) == 6
    test = pl.read_csv(tiny_data / "test.csv")
    demographics = pl.read_csv(tiny_data / "test_demographics.csv")
    _, sequence, demo = next(iter(ti._gateway_sequences(test, demographics, seed=3)))
    raw, values = predictor.sanitize(sequence, demo)
    starts = np.zeros(raw.shape[0], dtype=bool)
    starts[0] = True
    left = np.full(raw.shape[0], values["handedness"] == 0)
    inputs = ti.SequenceInputs(ti.frame_feature_matrix(raw, starts, left), values)
    torch_family = families["torch"]
    stacked = torch_family.predict(inputs)                  # one stacked net, weighted
    torch_family.stack = None
    looped = torch_family.predict(inputs)                   # member by member, weighted
    np.testing.assert_allclose(stacked, looped, atol=1e-6)
    members = []
    for net, mean, std, pad_len in torch_family.models:
        x, mask = ti.pad_last_frames(inputs.channels("full"), pad_len)
        x = ti.standardize_frames(x[None], mask[None], mean, std)
        members.append(ti.predict_torch_probs(net, x, mask[None], torch_family.runtime, with_orientation=True)[0])
    halves = 0.5 * np.mean(members[:4], axis=0) + 0.5 * np.mean(members[4:], axis=0)
    np.testing.assert_allclose(looped, halves[:18], atol=1e-6)
    np.testing.assert_allclose(inputs.orientation["torch"], halves[18:], atol=1e-6)
    keras_family = families["keras"]
    x, mask = ti.pad_last_frames(inputs.channels("full"), keras_family.pad_len)
    each = [np.asarray(m.predict_on_batch([x[None], mask[None]]))[0] for m in keras_family.models]
    halves = 0.5 * np.mean(each[:4], axis=0) + 0.5 * np.mean(each[4:], axis=0)     # 18 gestures, 4 orientations
    np.testing.assert_allclose(keras_family.predict(inputs), halves[:18], atol=1e-5)
    np.testing.assert_allclose(inputs.orientation["keras"], halves[18:], atol=1e-5)


def test_out_of_fold_rows_average_the_seeds(tiny_data):
    """cross_validate_deep with a stand-in trainer: each seed answers a constant; the out-of-fold rows hold
    their mean, and the refit jobs see every sequence and no out-of-fold rows."""
    train = ti.load_train_data(tiny_data)
    frame_pass = ti.SequenceFrames.from_table(train, mirror_left_handed=True)
    cache = ti.frame_cache_for_run(frame_pass, None, ti.FrameCacheConfig())
    inputs = ti.DeepInputs(cache, frame_pass.ids, frame_pass.lengths)
    sequences = ti.sequence_table(train)
    folds = ti.make_folds(sequences, 2, 0)
    jobs = []

    def fit_model(job):
        jobs.append(job)
        seed_index = (job.seed - 5) // ti.SEED_STRIDE
        probs = np.zeros((len(job.y_valid), 18))
        probs[:, seed_index] = 1.0                            # seed 0 says gesture 0, seed 1 gesture 1
        score = ti.score_probabilities(job.y_valid, probs) if len(job.y_valid) else None
        return {"probs": probs, "oof_chosen": {"probs": probs, "score": score, "epoch": 1}, "score": score,
                "epoch": job.epochs, "epochs_run": job.epochs, "stopped_early": False, "history": [{"seconds": 0.0}],
                "micro_batch": 1, "accum_steps": 1, "path": f"models/{job.name}"}

    result = ti.cross_validate_deep("torch", "imu", inputs, sequences, folds, ti.RecipeConfig(), 5, 90, 2, 3, True,
                                    fit_model, None)
    expected = np.zeros(18)
    expected[:2] = 0.5
    np.testing.assert_allclose(result.oof_probs, np.tile(expected, (sequences.height, 1)))
    refits = [job for job in jobs if job.name.startswith("torch_imu_full")]
    assert [job.name for job in refits] == ["torch_imu_full", "torch_imu_full_seed1"]
    assert all(len(job.data.y) == sequences.height and len(job.y_valid) == 0 and job.epochs == 3 for job in refits)
    assert result.refit_paths == ["models/torch_imu_full", "models/torch_imu_full_seed1"]
    assert len({job.seed for job in jobs}) == len(jobs)     # no two models share a seed
    torch_seeds = {job.seed for job in jobs}
    jobs.clear()
    ti.cross_validate_deep("keras", "imu", inputs, sequences, folds, ti.RecipeConfig(), 5, 90, 2, 3, True, fit_model, None)
    assert not torch_seeds & {job.seed for job in jobs}     # Keras draws other initialisations and epochs than Torch
