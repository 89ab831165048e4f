"""Score ablation: what each ingredient of the deep models' training recipe is worth, out of fold AND on the
synthetic hold-out subjects answered through predict(), per route and per family, over several CMI_SEED values.

    python bench/bench_score.py --out DIR                         # 40 training subjects, 3 seeds, 40 epochs
    python bench/bench_score.py --subjects 40 --seeds 42 43 44 --epochs 40 --workers 8 --out DIR
    python bench/bench_score.py --rows base new --baseline-script old_train_infer.py --out DIR
    python bench/bench_score.py --report DIR                      # the table of the jobs already in DIR
    python bench/bench_score.py --subjects 16 --epochs 0 --rows base new --baseline-script old.py --out DIR
                                                                  # on a CPU: each script at its CPU defaults

Data: a fixed slice of the `full` synthetic set (bench/common.py): its first N training subjects (sorted ids)
for training and all of its test subjects as the hold-out, whose labels no model sees. Each row of the table
is one recipe; rows are cumulative (each adds one ingredient to the row above), except the first (today's
recipe: the script as it was before these ingredients, `--baseline-script`, run at the same budget) and the
last (the final recipe with DEEP_SELECTION=inner). Each (row, seed) is one run of the main job, in a child
process, with the row's environment variables, then one pass of predict()'s code over the hold-out in
another child that records each family's probabilities and predict()'s answer. Jobs run `--workers` at a
time (a GPU serves several small trainings at once); the table is rewritten after every job, so a run cut
short still leaves its finished rows. Defaults are chosen on the out-of-fold columns; the hold-out columns
are reported, not tuned on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

NO_AUGMENTATION = {"AUG_STRETCH": "0", "AUG_CROP": "0", "AUG_ROTATION_DEG": "0", "AUG_JITTER": "0", "AUG_NOISE": "0",
                   "AUG_SENSOR_DROPOUT": "0", "AUG_MIXUP": "0", "AUG_LABEL_SMOOTHING": "0"}
ALL_FAMILIES, TORCH_ONLY = ("lgbm", "torch", "keras"), ("torch",)
NO_HEADS = {"AUX_ORIENTATION_WEIGHT": "0", "AUX_PHASE_WEIGHT": "0"}


def _without(*names: str) -> dict[str, str]:
    """NO_AUGMENTATION minus the named switches: those stay at the script's defaults."""
    return {k: v for k, v in NO_AUGMENTATION.items() if k not in names}


# (key, label, environment, families). Cumulative: each row switches one more ingredient back on.
ROWS = [
    ("base", "today's recipe (before: epoch chosen on the OOF fold, zero-filled inputs, batch 512)", {}, ALL_FAMILIES),
    ("honest", "honest selection, one-cycle to the end, inputs that mean what they say; no augmentation",
     NO_AUGMENTATION, TORCH_ONLY),
    ("smooth", "+ label smoothing 0.1", _without("AUG_LABEL_SMOOTHING"), TORCH_ONLY),
    ("mixup", "+ mixup", _without("AUG_LABEL_SMOOTHING", "AUG_MIXUP"), TORCH_ONLY),
    ("time", "+ stretch and front crop", _without("AUG_LABEL_SMOOTHING", "AUG_MIXUP", "AUG_STRETCH", "AUG_CROP"),
     TORCH_ONLY),
    ("jitter", "+ gain jitter and noise", _without("AUG_LABEL_SMOOTHING", "AUG_MIXUP", "AUG_STRETCH", "AUG_CROP",
                                                   "AUG_JITTER", "AUG_NOISE"), TORCH_ONLY),
    ("rotation", "+ rotation", {"AUG_SENSOR_DROPOUT": "0"}, TORCH_ONLY),
    ("new", "the new default: every ingredient (the row above + sensor dropout)", {}, ALL_FAMILIES),
    ("inner", "the new default with DEEP_SELECTION=inner (EarlyStopper on held-back subjects)",
     {"DEEP_SELECTION": "inner"}, TORCH_ONLY),
    ("seeds", "the new default + 3 seeds per deep model (DL_SEEDS=3, KERAS_SEEDS=3)",
     {"DL_SEEDS": "3", "KERAS_SEEDS": "3"}, ALL_FAMILIES),
    ("refit", "the new default + the full-data refit (FULL_FIT=1)", {"FULL_FIT": "1"}, ALL_FAMILIES),
    ("together", "the new default + 3 seeds + the full-data refit (a GPU run's defaults at this budget's sizes)",
     {"DL_SEEDS": "3", "KERAS_SEEDS": "3", "FULL_FIT": "1"}, ALL_FAMILIES),
    # How the sequence is read (with --baseline-script = the version before front padding, for 'base'):
    ("front", "front padding + the data's quaternion sign; no auxiliary head, Keras stacked like Torch",
     {**NO_HEADS, "KERAS_ARCHITECTURE": "stacked"}, ALL_FAMILIES),
    ("orientation", "front + the orientation head (weight 0.5) alone",
     {"AUX_ORIENTATION_WEIGHT": "0.5", "AUX_PHASE_WEIGHT": "0", "KERAS_ARCHITECTURE": "stacked"}, ALL_FAMILIES),
    ("phase", "front + the phase head (weight 0.5, and its attention) alone", {"KERAS_ARCHITECTURE": "stacked"},
     ALL_FAMILIES),
    ("heads", "front + both heads", {"AUX_ORIENTATION_WEIGHT": "0.5", "KERAS_ARCHITECTURE": "stacked"}, ALL_FAMILIES),
    ("branches", "front + Keras's sensor-group branches (and its own seeds) alone", NO_HEADS, ALL_FAMILIES),
    ("views", "the default: front, the phase head, Keras's branches", {}, ALL_FAMILIES),
    ("pad120", "the default, pad 120", {"DL_FIXED_PAD_LEN": "120", "KERAS_FIXED_PAD_LEN": "120"}, ALL_FAMILIES),
    ("pad128", "the default, pad 128", {"DL_FIXED_PAD_LEN": "128", "KERAS_FIXED_PAD_LEN": "128"}, ALL_FAMILIES),
    # A subject's assignment and turned devices: the joint assignment forced on, so that the hold-out's decisions
    # compare it with the pooled one and none (both replayed out of fold in artifacts.json either way).
    ("joint", "the default, the joint assignment forced on", {"ENSEMBLE_ASSIGNMENT": "joint",
                                                              "ENSEMBLE_PER_SUBJECT": "1"}, ALL_FAMILIES),
]


def make_slice(n_subjects: int, out: Path, turned_test: int = 0) -> Path:
    """The first n training subjects of the `full` synthetic set, with all its test subjects: written once.
    ``turned_test``: that many of the test subjects (the first, sorted) wear the device turned 180 degrees
    about z (train_infer's _turn_device_raw_inplace on their raw rows; test_labels.csv marks them)."""
    import polars as pl
    from common import full_synthetic_dir
    done = out / "slice.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == [n_subjects, turned_test]:
        return out
    full = full_synthetic_dir()
    demographics = pl.read_csv(full / "train_demographics.csv", schema_overrides={"subject": pl.String})
    subjects = sorted(demographics["subject"].to_list())[:n_subjects]
    out.mkdir(parents=True, exist_ok=True)
    train = pl.read_csv(full / "train.csv", schema_overrides={"subject": pl.String}, infer_schema_length=20000)
    train.filter(pl.col("subject").is_in(subjects)).write_csv(out / "train.csv")
    demographics.filter(pl.col("subject").is_in(subjects)).write_csv(out / "train_demographics.csv")
    for name in ("test.csv", "test_demographics.csv", "test_labels.csv"):
        shutil.copy(full / name, out / name)
    if turned_test:
        import train_infer as ti
        turned = sorted(pl.read_csv(full / "test_demographics.csv", schema_overrides={"subject": pl.String})
                        ["subject"].to_list())[:turned_test]
        test = ti.read_competition_csv(full / "test.csv", ti.TEST_COLUMNS)
        ti.turn_subjects_back(test, turned).write_csv(out / "test.csv")      # the turn is its own inverse
        labels = pl.read_csv(full / "test_labels.csv", schema_overrides={"subject": pl.String})
        labels.with_columns(device_turned=pl.col("device_turned") | pl.col("subject").is_in(turned)).write_csv(
            out / "test_labels.csv")
    done.write_text(json.dumps({"key": [n_subjects, turned_test], "ids": subjects}))
    return out


def evaluate_holdout(script: Path, artifacts: Path, data_dir: Path) -> dict:
    """Answer every hold-out sequence with the script's own predictor (as predict() does: the gateway's order,
    each family's probabilities, the route's blend, the per-subject assignment when it is on) and score each
    family alone, the blend, and predict()'s answers, per route. Runs in the child (see main)."""
    import importlib.util
    import polars as pl
    spec = importlib.util.spec_from_file_location("scored_script", script)
    ti = importlib.util.module_from_spec(spec)
    sys.modules["scored_script"] = ti
    spec.loader.exec_module(ti)
    ti.setup_logging(None)
    ti.configure_inference(artifacts)
    predictor = ti._get_predictor()
    seen: dict[str, np.ndarray] = {}
    for entries in predictor.models.values():                  # record what each family answers
        for name, family in entries:
            def recorded(inputs, _predict=family.predict, _name=name):
                seen[_name] = probs = _predict(inputs)
                return probs
            family.predict = recorded
    test = ti.read_competition_csv(data_dir / "test.csv", ti.TEST_COLUMNS)
    demographics = pl.read_csv(data_dir / "test_demographics.csv", schema_overrides={"subject": pl.String})
    label_table = pl.read_csv(data_dir / "test_labels.csv")
    labels = dict(label_table.select("sequence_id", "gesture").iter_rows())
    imu_only = dict(label_table.select("sequence_id", "imu_only").iter_rows())
    turned = (dict(label_table.select("sequence_id", "device_turned").iter_rows())
              if "device_turned" in label_table.columns and label_table["device_turned"].any() else {})
    answers: dict[str, dict[str, str]] = {}
    arrivals: list[tuple[str, str, np.ndarray]] = []          # (sequence, subject, blend) in the gateway's order
    for sequence_id, sequence, demo in ti._gateway_sequences(test, demographics, 0):
        seen.clear()
        probs, _, orientation = predictor.predict_sequence(sequence, demo)
        arrivals.append((sequence_id, str(sequence["subject"][0]), probs, orientation))
        row = {name: ti.GESTURES[int(np.argmax(p))] for name, p in seen.items()}
        row["blend"] = ti.GESTURES[int(np.argmax(probs))]
        row["predict"] = ti.GESTURES[predictor.answer(sequence, probs, orientation)]
        answers[sequence_id] = row
    scores: dict[str, dict[str, float]] = {}
    groups = [("imu", lambda s: imu_only[s]), ("full", lambda s: not imu_only[s]), ("all", lambda s: True)]
    if turned:                                                  # subjects wearing the device turned vs the others
        groups += [("turned", lambda s: turned[s]), ("usual", lambda s: not turned[s])]
    for route, keep in groups:
        ids = [s for s in answers if keep(s)]
        for who in sorted({k for s in ids for k in answers[s]}):
            scored = [s for s in ids if who in answers[s]]
            scores.setdefault(who, {})[route] = round(ti.competition_score(
                [labels[s] for s in scored], [answers[s][who] for s in scored]).score, 4)
    if hasattr(ti, "decide_gestures"):                          # scripts that decode and assign the new way
        manifest = json.loads((artifacts / "artifacts.json").read_text())
        truth = np.array([ti.GESTURES.index(labels[s]) for s, *_ in arrivals])
        scores["decisions"] = {name: round(ti.fast_competition_score(truth, answered), 4)
                               for name, answered in replay_decisions(ti, arrivals, manifest).items()}
    return scores


def previous_assignment(history: np.ndarray, quota: np.ndarray) -> int:
    """The per-subject assignment as it was before the pooled bucket, for the comparison only: the last row's
    gesture in the joint labelling of the subject's rows with one quota per gesture (18 buckets)."""
    from scipy.optimize import linear_sum_assignment
    n = history.shape[0]
    if n <= 1:
        return int(history[-1].argmax())
    slots = np.repeat(np.arange(history.shape[1]), np.maximum(quota, 1))
    if len(slots) < n:
        slots = np.concatenate([slots, np.tile(np.arange(history.shape[1]), -(-(n - len(slots)) // history.shape[1]))])
    rows, cols = linear_sum_assignment(-np.log(np.clip(history, 1e-9, 1.0))[:, slots])
    return int(slots[cols[rows == n - 1][0]])


def replay_decisions(ti, arrivals: list, manifest: dict) -> dict[str, np.ndarray]:
    """The hold-out's blended probabilities, in the gateway's order, answered by each decision: both decodings
    alone, the previous per-gesture assignment (always on, argmax), the pooled assignment always on, and the
    default (the decoding and on/off the training run chose out of fold); with orientation probabilities, the
    joint assignment always on too."""
    probs = np.stack([a[2] for a in arrivals])
    subjects = [a[1] for a in arrivals]
    orientations = [a[3] for a in arrivals]
    quota = manifest["per_subject"]["quota"]
    quota18 = np.array([quota[g] for g in ti.GESTURES])
    capacity = ti.pooled_capacity(quota)
    decoding = manifest.get("decoding", "argmax")
    out = {f"{d} alone": ti.decide_gestures(probs, d) for d in ti.DECODINGS}
    previous, pooled, seen = [], [], {}
    for i, subject in enumerate(subjects):
        seen.setdefault(subject, []).append(i)
        history = probs[seen[subject]]
        previous.append(previous_assignment(history, quota18))
        pooled.append(ti.assign_within_subject(history, capacity, decoding))
    out["previous assignment (per gesture, argmax)"] = np.array(previous)
    out["pooled assignment, always on"] = np.array(pooled)
    chosen = np.array(pooled)
    joint = manifest["per_subject"].get("joint_capacity")
    if joint is not None and all(o is not None for o in orientations) and hasattr(ti, "assign_jointly"):
        capacity, answered = np.asarray(joint), []
        for i, subject in enumerate(subjects):
            rows = seen[subject][: seen[subject].index(i) + 1]      # the subject's arrivals up to this one
            answered.append(ti.assign_jointly(probs[rows], np.stack([orientations[r] for r in rows]), capacity,
                                              decoding))
        out["joint assignment, always on"] = np.array(answered)
        if manifest["per_subject"].get("assignment") == "joint":
            chosen = out["joint assignment, always on"]
    out["default"] = chosen if manifest["per_subject"]["enabled"] else out[f"{decoding} alone"]
    return out


def run_job(row: tuple, seed: int, args: argparse.Namespace, data_dir: Path, lock: threading.Lock) -> dict:
    key, _, env_row, families = row
    out = args.out / "jobs" / f"{key}_seed{seed}"
    result_file = out / "score.json"
    if result_file.is_file():                                    # finished earlier: reuse
        return json.loads(result_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    script = args.baseline_script if key == "base" else ROOT / "train_infer.py"
    epochs = {"DL_EPOCHS": str(args.epochs), "KERAS_EPOCHS": str(args.epochs)} if args.epochs else {}
    env = dict(os.environ, CMI_SEED=str(seed), **epochs, RUN_INFERENCE="0", LGBM_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", **{f"RUN_{f.upper()}_TRAINING": "1" if f in families else "0"
                                        for f in ALL_FAMILIES}, **env_row)
    started = time.perf_counter()
    with open(out / "train.log", "w") as log:
        code = subprocess.run([sys.executable, str(script), "--data-dir", str(data_dir), "--output-dir", str(out)],
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{key} seed {seed}: the main job failed (exit {code}); see {out / 'train.log'}")
    train_seconds = time.perf_counter() - started
    with open(out / "holdout.log", "w") as log:
        code = subprocess.run([sys.executable, __file__, "--evaluate", str(script), str(out), str(data_dir)],
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{key} seed {seed}: the hold-out pass failed (exit {code}); see {out / 'holdout.log'}")
    summary = json.loads((out / "run_summary.json").read_text())
    oof = {f"{r['family']}/{r['route']}": r["oof_score"] for r in summary["summary"]}
    chosen = {f"{r['family']}/{r['route']}": r["note"].rsplit(" ", 1)[-1] for r in summary["summary"]
              if "would claim" in (r.get("note") or "")}
    holdout = json.loads((out / "holdout.json").read_text())
    manifest = json.loads((out / "artifacts.json").read_text())
    decisions = {"decoding": manifest.get("decoding"), "decoding_scores": manifest.get("decoding_scores"),
                 "per_subject": {k: manifest.get("per_subject", {}).get(k) for k in ("enabled", "gain", "noise")}}
    result = {"row": key, "seed": seed, "oof": oof, "oof_chosen": chosen, "holdout": holdout, "decisions": decisions,
              "train_seconds": round(train_seconds, 1), "epochs": args.epochs, "machine": machine_line()}
    result_file.write_text(json.dumps(result, indent=1))
    with lock:
        print(f"done {key} seed {seed}: {train_seconds:.0f} s", flush=True)
    return result


def cell(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def machine_line() -> str:
    return f"{platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}" + _gpu_name()


def table(results: list[dict], seeds: list[int], header: str) -> str:
    """Markdown: per row, OOF and hold-out per family and route, mean ± std over the seeds; the machine line is
    the jobs' own (where they ran), not this process's."""
    columns = [("LightGBM", "lgbm"), ("Torch", "torch"), ("Keras", "keras"), ("ensemble", "ensemble")]
    machines = sorted({r.get("machine", "not recorded") for r in results}) or [machine_line()]
    lines = [header, "Machine: " + "; ".join(machines), "", "| recipe | seeds | " + " | ".join(
        f"{name} {route} OOF | {name} {route} hold-out" for name, _ in columns for route in ("imu", "full"))
        + " | predict() all hold-out |", "| --- | ---: |" + " ---: |" * (4 * len(columns) + 1)]
    for key, label, _, _ in ROWS:
        rows = [r for r in results if r["row"] == key]
        if not rows:
            continue
        cells = []
        for _, family in columns:
            holdout_key = "blend" if family == "ensemble" else family
            for route in ("imu", "full"):
                cells.append(cell([r["oof"].get(f"{family}/{route}") for r in rows]))
                cells.append(cell([r["holdout"].get(holdout_key, {}).get(route) for r in rows]))
        cells.append(cell([r["holdout"].get("predict", {}).get("all") for r in rows]))
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    chosen = [r for r in results if r["row"] == "new" and r["oof_chosen"]]
    if chosen:
        lines += ["", "Honest selection, the new default: out-of-fold at the kept (last) epoch against the score the "
                  "epochs chosen on the out-of-fold rows themselves would claim (the old selection's optimism):", "",
                  "| family/route | OOF, fixed epochs (honest) | OOF, epoch chosen on the OOF rows |",
                  "| --- | ---: | ---: |"]
        for name in sorted(chosen[0]["oof_chosen"]):
            lines.append(f"| {name} | {cell([r['oof'][name] for r in chosen])} | "
                         f"{cell([float(r['oof_chosen'][name]) for r in chosen])} |")
    decided = [r for r in results if r["row"] == "new" and "decisions" in r["holdout"]]
    if decided:
        lines += ["", "Decisions on the new default's models (the same models, answered in the gateway's order): "
                  "out of fold, the honest test-like mix of the training run; hold-out, every test subject:", "",
                  "| decision | OOF (test-like mix) | hold-out all |", "| --- | ---: | ---: |"]
        oof_of = {"argmax alone": lambda r: (r["decisions"]["decoding_scores"] or {}).get("argmax"),
                  "nine_way alone": lambda r: (r["decisions"]["decoding_scores"] or {}).get("nine_way")}
        for name in decided[0]["holdout"]["decisions"]:
            lines.append(f"| {name} | {cell([oof_of[name](r) if name in oof_of else None for r in decided])} | "
                         f"{cell([r['holdout']['decisions'][name] for r in decided])} |")
        chosen_lines = []
        for r in sorted(decided, key=lambda r: r["seed"]):
            assignment = r["decisions"]["per_subject"]
            chosen_lines.append(f"{r['seed']}: {r['decisions']['decoding']} decoding, assignment gain "
                                f"{assignment['gain']:+.4f} vs noise {assignment['noise']:.4f} -> "
                                f"{'on' if assignment['enabled'] else 'off'}")
        lines += ["", "Chosen out of fold per seed: " + "; ".join(chosen_lines)]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--evaluate":        # the child that answers the hold-out
        script, artifacts, data_dir = (Path(p) for p in sys.argv[2:])
        scores = evaluate_holdout(script, artifacts, data_dir)
        (artifacts / "holdout.json").write_text(json.dumps(scores, indent=1))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the jobs and bench_score.md")
    parser.add_argument("--subjects", type=int, default=40, help="training subjects of the full set (default 40)")
    parser.add_argument("--data-dir", type=Path, help="a competition-format folder with test_labels.csv instead of "
                                                      "the slice (tests use a tiny one)")
    parser.add_argument("--turned-test", type=int, default=0, help="test subjects of the slice who wear the device "
                        "turned 180 degrees (default 0); the hold-out is then scored for them and the others apart")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="CMI_SEED values")
    parser.add_argument("--epochs", type=int, default=40, help="DL_EPOCHS and KERAS_EPOCHS (the GPU budget: 40); 0 = "
                        "unset: each script's own defaults for the device (on a CPU, its CPU budget)")
    parser.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], help="row keys to run")
    parser.add_argument("--families", nargs="+", choices=ALL_FAMILIES, help="train only these families in every "
                        "row (default: each row's own)")
    parser.add_argument("--workers", type=int, default=1, help="jobs at a time")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per job (LightGBM, OpenMP)")
    parser.add_argument("--baseline-script", type=Path, help="today's train_infer.py, for the 'base' row")
    parser.add_argument("--report", action="store_true", help="only print the table of the jobs in --out")
    args = parser.parse_args()
    args.out = args.out.resolve()
    source = (f"the competition-format folder {args.data_dir}" if args.data_dir else
              f"{args.subjects} training subjects of the `full` synthetic set, its test subjects as the hold-out")
    budget = f"{args.epochs} epochs" if args.epochs else "each script's own device defaults"
    header = (f"Score ablation: {source}; {budget}; CMI_SEED {', '.join(map(str, args.seeds))}; mean ± std "
              "over seeds.")
    header_file = args.out / "bench_score_header.txt"         # --report prints the header of the run it reports
    results: list[dict] = []
    if args.report and header_file.is_file():
        header = header_file.read_text().strip()
    if not args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        header_file.write_text(header + "\n")
        if "base" in args.rows and (args.baseline_script is None or not args.baseline_script.is_file()):
            raise SystemExit("the 'base' row needs --baseline-script: today's train_infer.py (e.g. git show "
                             "REF:train_infer.py > old.py)")
        data_dir = (args.data_dir.resolve() if args.data_dir else
                    make_slice(args.subjects, args.out / "data", args.turned_test))
        lock = threading.Lock()
        # The rows the comparison hangs on first (today's recipe, the new default), so that a run cut short
        # still has them; then the ablation chain.
        order = sorted(ROWS, key=lambda row: (row[0] not in ("base", "new"), ROWS.index(row)))
        if args.families:
            order = [(key, label, env, tuple(args.families)) for key, label, env, _ in order]
        jobs = [(row, seed) for row in order if row[0] in args.rows for seed in args.seeds]
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(run_job, row, seed, args, data_dir, lock) for row, seed in jobs]
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except Exception as exc:                        # the other jobs go on; the table says what is missing
                    print(f"FAILED: {exc}", flush=True)
                (args.out / "bench_score.md").write_text(table(results, args.seeds, header) + "\n")
    else:
        results = [json.loads(p.read_text()) for p in sorted((args.out / "jobs").glob("*/score.json"))]
    text = table(results, args.seeds, header)
    (args.out / "bench_score.md").write_text(text + "\n")
    print(text)


def _gpu_name() -> str:
    try:
        import torch
        return f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    except ImportError:
        return ""


if __name__ == "__main__":
    main()
