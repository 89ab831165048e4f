"""predict() latency on this machine, one sequence at a time as the gateway sends them, with a saved model set
loaded: today's script (the nets of a variant stacked through torch.func), the same with a plain loop over the
nets, and optionally another version of the script (--baseline-script) on the SAME saved models.

    python bench/bench_predict.py                                   # the default run's models (CPU sizes)
    python bench/bench_predict.py --sizes cpu gpu                   # and a GPU default run's model set
    python bench/bench_predict.py --baseline-script old.py          # old.py: e.g. git show HEAD~1:train_infer.py
    python bench/bench_predict.py --model-dir DIR --data-dir DATA   # a training run's models, DATA's test.csv

A model set is trained once per size on the demo synthetic set, for one epoch (latency does not depend on the
weights), into bench/.cache/predict_<size>/: `cpu` is the default run on a CPU (5 folds, CPU network sizes, one
seed), `gpu` what a GPU default run saves (the notes' network sizes, 3 seeds per fold and the full-data refit:
18 Torch nets, 18 Keras models and 6 boosters per route). The implementations answer the same sequences in turn,
call by call and each first in turn, so the machine's load falls on all of them alike. Prints a Markdown table
for the README.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from common import CACHE, ROOT, ti

SIZES = {  # the environment of the training run that saves each model set
    "cpu": {},
    "gpu": {"DL_CONV_WIDTH": "128", "DL_HIDDEN": "128", "KERAS_CONV_WIDTH": "128", "KERAS_HIDDEN": "128",
            "DL_SEEDS": "3", "KERAS_SEEDS": "3", "FULL_FIT": "1", "DL_BATCH_SIZE": "512", "KERAS_BATCH_SIZE": "512"},
}


def model_set(size: str, cache: Path) -> Path:
    """The saved models of a `size` run (trained here once: one epoch, demo set, no inference)."""
    folder = cache / f"predict_{size}"
    if (folder / ti.ARTIFACT_MANIFEST).is_file():
        return folder
    env = {k: v for k, v in os.environ.items()} | SIZES[size] | {
        "DL_EPOCHS": "1", "KERAS_EPOCHS": "1", "CMI_SCRATCH_DIR": str(cache / "scratch")}
    command = [sys.executable, str(ROOT / "train_infer.py"), "--synthetic", "--no-inference", "--output-dir",
               str(folder)]
    print(f"Training the {size} model set (one epoch): {' '.join(command)}", flush=True)
    with open(cache / f"predict_{size}.log", "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return folder


def load_script(path: Path, name: str):
    """Another train_infer.py, imported as its own module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                                # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def loaded(module, folder: Path, loop: bool = False) -> tuple[object, float]:
    """(a predict function answering from ``folder``'s models, seconds to load them)."""
    started = time.perf_counter()
    module.configure_inference(folder)
    predictor = module._get_predictor(strict=True)
    seconds = time.perf_counter() - started
    if loop:                                                 # the plain loop over the nets instead of the stack
        for entries in predictor.models.values():
            for family, models in entries:
                if family == "torch":
                    models.stack = None
    state = dict(module._PREDICTOR_STATE)

    def answer(sequence, demographics):
        module._PREDICTOR_STATE.update(state)                 # this implementation's loaded models
        return module.predict(sequence, demographics)

    return answer, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["cpu"])
    parser.add_argument("--calls", type=int, default=300, help="sequences answered by each implementation")
    parser.add_argument("--baseline-script", type=Path, help="another train_infer.py to time on the same models")
    parser.add_argument("--model-dir", type=Path, help="time these saved models instead of training a model set")
    parser.add_argument("--data-dir", type=Path, help="the test.csv to answer (default: the demo synthetic set's)")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    ti.setup_logging(None)
    data_dir = args.data_dir or ti.generate_synthetic_competition_data(args.cache / "demo",
                                                                       *ti.SYNTHETIC_SIZES["demo"], 42)
    test = pl.read_csv(data_dir / "test.csv")
    demographics = pl.read_csv(data_dir / "test_demographics.csv")
    calls = list(ti._gateway_sequences(test, demographics, seed=0))[: args.calls]
    baseline = load_script(args.baseline_script, "baseline_train_infer") if args.baseline_script else None
    model_sets = ({args.model_dir.name: args.model_dir} if args.model_dir else
                  {size: model_set(size, args.cache) for size in args.sizes})
    rows = []
    for size, folder in model_sets.items():
        implementations = {"torch.func stack (this script)": loaded(ti, folder),
                           "plain loop over the nets (this script)": loaded(ti, folder, loop=True)}
        if baseline is not None:
            implementations[f"{args.baseline_script.name}"] = loaded(baseline, folder)
        seconds = {name: [] for name in implementations}
        answers = {name: [] for name in implementations}
        names = list(implementations)
        for i, (_, sequence, demo_row) in enumerate(calls):
            for name in names[i % len(names):] + names[:i % len(names)]:     # each goes first in turn
                predict = implementations[name][0]
                started = time.perf_counter()
                answers[name].append(predict(sequence, demo_row))
                seconds[name].append(time.perf_counter() - started)
        reference = next(iter(answers.values()))
        for name, (_, load_seconds) in implementations.items():
            ms = 1000 * np.asarray(seconds[name][1:])
            agree = np.mean([a == b for a, b in zip(answers[name], reference)])
            rows.append((size, name, load_seconds, np.percentile(ms, 50), np.percentile(ms, 95), agree))
    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"torch {__import__('torch').__version__}; {len(calls)} sequences of the demo set's test subjects in "
          "gateway order, each implementation in turn\n")
    print("| models | predict() | load, s | p50, ms | p95, ms | same answers |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for size, name, load_seconds, p50, p95, agree in rows:
        print(f"| {size} | {name} | {load_seconds:.1f} | {p50:.1f} | {p95:.1f} | {agree:.0%} |")


if __name__ == "__main__":
    main()
