"""Stage timings of the spine on the `full` synthetic set (81 subjects, ~8,150 sequences, ~575k rows).

    python bench/bench_spine.py                 # everything: load, features, LightGBM 5 folds x 2, predict()
    python bench/bench_spine.py --predict-n 500 # more predict() calls for the latency percentiles
    python bench/bench_spine.py --mirror-ablation  # also LightGBM without mirroring left-handed subjects

The synthetic set is generated once into bench/.cache/ (reused while its manifest matches). Prints a
Markdown table for the README; the machine is printed with it. The default end-to-end run (every family)
is bench_end_to_end.py's. Figures are wall-clock seconds on a shared machine: compare rows of one run, not
runs of different days.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from common import CACHE, full_synthetic_dir, print_stage_table, ti, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--predict-n", type=int, default=300, help="predict() calls for p50/p95")
    parser.add_argument("--mirror-ablation", action="store_true",
                        help="also cross-validate LightGBM without mirroring left-handed subjects (DATA.md: measure it)")
    args = parser.parse_args()
    ti.setup_logging(None)
    rows: list[tuple[str, str, str]] = []
    cache = Path(args.cache)

    data_dir, seconds = timed(full_synthetic_dir, cache)
    rows.append(("synthetic `full` set (generate, or reuse cache)", f"{seconds:.1f} s", ""))

    train, seconds = timed(ti.load_train_data, data_dir)
    rows.append(("load train.csv + demographics (polars)", f"{seconds:.1f} s",
                 f"{train.height:,} rows x {len(ti.TRAIN_COLUMNS)} columns"))
    sequences = ti.sequence_table(train)
    # The combined stage first, cold, as a training run calls it; then its two parts, warm.
    features, t_table = timed(ti.build_feature_table, train, True)
    rows.append(("**frame + aggregate + demographics, as in a run** (target < 20 s)", f"**{t_table:.1f} s**",
                 f"{features.height:,} sequences x {features.width - 1} features"))
    frames, t_frames = timed(ti.build_frame_features, train, True)
    rows.append(("of which frame features, whole table", f"{t_frames:.1f} s", f"{frames.width - 1} features per frame"))
    aggregates, t_agg = timed(ti.aggregate_features, frames)
    rows.append(("of which aggregate features (polars group_by)", f"{t_agg:.1f} s",
                 f"{aggregates.width - 1} per sequence"))
    del frames, aggregates

    settings = ti.Settings.from_env()
    folds = ti.make_folds(sequences, settings.cfg.N_FOLDS, settings.cfg.SEED)
    model_dir = Path(tempfile.mkdtemp(prefix="bench_models_"))
    results = []
    for variant in ti.VARIANTS:
        result = ti.train_lgbm(features, sequences, folds, variant, settings.lgbm, settings.cfg.SEED, model_dir)
        results.append(result)
        per_fold = [m["seconds"] for m in result.fold_metrics]
        rows.append((f"LightGBM {variant}: seconds per fold (mean, min-max)",
                     f"{np.mean(per_fold):.1f} s", f"{min(per_fold):.1f}-{max(per_fold):.1f} s; OOF score "
                     f"{result.overall.score:.4f} (BinF1 {result.overall.binary_f1:.4f}, "
                     f"MacroF1 {result.overall.macro_f1:.4f})"))
    if args.mirror_ablation:
        unmirrored = ti.build_feature_table(train, mirror_left_handed=False)
        for variant, mirrored in zip(ti.VARIANTS, results):
            result = ti.train_lgbm(unmirrored, sequences, folds, variant, settings.lgbm, settings.cfg.SEED,
                                   Path(tempfile.mkdtemp(prefix="bench_unmirrored_")))
            rows.append((f"LightGBM {variant} without mirroring left-handed subjects", "",
                         f"OOF score {result.overall.score:.4f} vs {mirrored.overall.score:.4f} mirrored "
                         f"({mirrored.overall.score - result.overall.score:+.4f} from mirroring)"))
        del unmirrored
    ti.write_artifact_manifest(model_dir, settings, results, {c: 1.0 if c == "handedness" else 0.0
                                                             for c in ti.DEMOGRAPHIC_FEATURES}, {})
    del train, features

    test = pl.read_csv(data_dir / "test.csv")
    demographics = pl.read_csv(data_dir / "test_demographics.csv")
    ti.configure_inference(model_dir)
    latencies, routes = [], {"imu": 0, "full": 0}
    for i, (_, sequence, demo) in enumerate(ti._gateway_sequences(test, demographics, seed=0)):
        if i > args.predict_n:
            break
        answer, seconds = timed(ti.predict, sequence, demo)
        assert answer in ti.GESTURES
        if i == 0:
            rows.append(("predict() first call (loads 10 boosters)", f"{seconds * 1000:.0f} ms", ""))
            continue
        latencies.append(seconds * 1000)
        routes[ti._get_predictor().route(ti.sensor_matrix(sequence))] += 1
    p50, p95 = np.percentile(latencies, [50, 95])
    rows.append(("**predict() per sequence, LightGBM only: p50 / p95** (target p50 < 20 ms)",
                 f"**{p50:.1f} / {p95:.1f} ms**", f"{len(latencies)} calls, gateway order; routes {routes}"))

    print_stage_table(rows, f"lightgbm {ti.library_versions().get('lightgbm')}, polars {pl.__version__}")


if __name__ == "__main__":
    main()
