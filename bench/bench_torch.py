"""Torch TimeSeriesNet: the design notes' new configuration against the old one, same data, same run; and,
with --force-oom, a real out-of-memory that the fallback must survive.

    python bench/bench_torch.py                              # full synthetic set, 5 folds, full-sensor variant
    python bench/bench_torch.py --subjects 40 --folds 0      # a quicker, partial comparison (say so when quoting)
    python bench/bench_torch.py --only new --force-oom --out DIR   # the GPU check: 5 folds + a forced OOM

new: pad 90, 3 pooling stages, batch 512 -- the notes' sections 1-1, 1-3, 2-1;
old: 95th-percentile pad, 2 pooling stages, batch 64.
Both train with the shared recipe (RecipeConfig: all epochs, augmentation, label smoothing) from the environment.
Prints seconds per epoch and per fold and the out-of-fold score of each, as a Markdown table (and writes it
to DIR/bench_torch.md with --out).

--force-oom: with CUDA, the memory one training step takes at micro-batch 512 and at 128 is measured, the
process is limited (torch.cuda.set_per_process_memory_fraction) to halfway between them, and fold 0 is trained
again: micro-batch 512 must raise a real CUDA out-of-memory error, and the fallback must finish the fold at a
smaller micro-batch. Without CUDA there is no such limit: the OOM is injected at micro-batches above 128
instead, and the table says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from common import full_synthetic_dir, ti

CONFIGS = {
    "new (pad 90, 3 pools, batch 512)": {"DL_FIXED_PAD_LEN": "90", "DL_POOLS": "3", "DL_BATCH_SIZE": "512"},
    "old (p95 pad, 2 pools, batch 64)": {"DL_FIXED_PAD_LEN": "0", "DL_POOLS": "2", "DL_BATCH_SIZE": "64"},
}


def dl_config(env: dict[str, str], epochs: int | None) -> ti.DLConfig:
    """DLConfig under ``env``. Both configurations get the GPU epoch budget (40) unless DL_EPOCHS or --epochs
    say otherwise."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        dl_cfg = ti.DLConfig()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    dl_cfg.EPOCHS = epochs or dl_cfg.EPOCHS
    return ti.resolve_device_defaults(dl_cfg, gpu=True, prefix="DL")    # the notes' network, GPU budget


def forced_oom_row(inputs: ti.DeepInputs, sequences: pl.DataFrame, folds: np.ndarray, variant: str,
                   dl_cfg: ti.DLConfig, seed: int, runtime: ti.TorchRuntime) -> tuple[str, ...]:
    """Train fold 0 under a memory limit that micro-batch 512 exceeds; return the table row."""
    import torch
    dl_cfg = dataclasses.replace(dl_cfg, EPOCHS=2, BATCH_SIZE=512, ACCUM_STEPS=1)
    hook: Callable[[int], None] | None = None
    if runtime.device.type == "cuda":
        def reserved_peak(micro: int) -> int:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            probe = dataclasses.replace(dl_cfg, EPOCHS=1, BATCH_SIZE=micro)
            ti.train_torch(inputs, sequences, folds, variant, probe, ti.RecipeConfig(), seed,
                           Path(tempfile.mkdtemp()), runtime, only_folds=[0])
            return torch.cuda.max_memory_reserved()

        high, low = reserved_peak(512), reserved_peak(128)
        limit = (high + low) // 2
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(limit / total)
        how = (f"real CUDA OOM: limit {limit / 2**20:.0f} MiB (peak reserved {high / 2**20:.0f} MiB at micro-batch "
               f"512, {low / 2**20:.0f} MiB at 128)")
    else:
        def injected(micro: int) -> None:
            if micro > 128:
                raise RuntimeError("CUDA out of memory (injected: no GPU, so no per-process memory limit)")
        hook, how = injected, "injected OOM above micro-batch 128 (no GPU)"
    started = time.perf_counter()
    try:
        result = ti.train_torch(inputs, sequences, folds, variant, dl_cfg, ti.RecipeConfig(), seed,
                                Path(tempfile.mkdtemp()), runtime, oom_hook=hook, only_folds=[0])
        outcome = (f"fold 0 finished at micro-batch {result.fold_metrics[0]['micro_batch']} x "
                   f"{result.fold_metrics[0]['effective_batch'] // result.fold_metrics[0]['micro_batch']} accumulation "
                   f"steps, score {result.overall.score:.4f}")
        survived = result.fold_metrics[0]["micro_batch"] < 512
    except Exception as exc:                                 # the bench reports the failure instead of dying
        outcome, survived = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", False
    finally:
        if runtime.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    return ("forced OOM (fold 0, 2 epochs)", how, outcome, "survived" if survived else "NOT survived",
            f"{time.perf_counter() - started:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="competition-format data (default: the full synthetic set)")
    parser.add_argument("--subjects", type=int, default=81, help="train subjects to use (all of the full set: 81)")
    parser.add_argument("--folds", type=int, nargs="*", help="fold indices to run (default: all 5)")
    parser.add_argument("--variant", default="full", choices=ti.VARIANTS)
    parser.add_argument("--only", choices=("new", "old"), help="run one configuration (to try settings quickly)")
    parser.add_argument("--epochs", type=int, help="epochs (default: DL_EPOCHS, else the GPU budget, 40)")
    parser.add_argument("--force-oom", action="store_true", help="also check the OOM fallback (see above)")
    parser.add_argument("--out", type=Path, help="also write the tables to DIR/bench_torch.md")
    args = parser.parse_args()
    ti.setup_logging(None)
    train = ti.load_train_data(args.data_dir or full_synthetic_dir())
    subjects = sorted(train["subject"].unique().to_list())[: args.subjects]
    train = train.filter(pl.col("subject").is_in(subjects))
    sequences = ti.sequence_table(train)
    settings = ti.Settings.from_env()
    folds = ti.make_folds(sequences, settings.cfg.N_FOLDS, settings.cfg.SEED)
    frames = ti.SequenceFrames.from_table(train, True)
    inputs = ti.DeepInputs(ti.frame_cache_for_run(frames, None, settings.frame_cache), frames.ids, frames.lengths)
    runtime = ti.torch_runtime()
    rows = []
    for name, env in CONFIGS.items():
        if args.only and not name.startswith(args.only):
            continue
        dl_cfg = dl_config(env, args.epochs)
        started = time.perf_counter()
        result = ti.train_torch(inputs, sequences, folds, args.variant, dl_cfg, settings.recipe, settings.cfg.SEED,
                                Path(tempfile.mkdtemp(prefix="bench_torch_")), runtime, only_folds=args.folds)
        seconds = time.perf_counter() - started
        per_fold = [m["seconds"] for m in result.fold_metrics]
        per_epoch = [m["seconds_per_epoch"] for m in result.fold_metrics]
        epochs = [m["epochs_run"] for m in result.fold_metrics]
        rows.append((name, ti.torch_pad_length(inputs.lengths, dl_cfg), np.mean(per_epoch), np.mean(per_fold),
                     f"{np.mean(epochs):.1f}", result.overall, seconds))
    oom = (forced_oom_row(inputs, sequences, folds, args.variant, dl_config(CONFIGS[next(iter(CONFIGS))], None),
                          settings.cfg.SEED, runtime) if args.force_oom else None)

    lines = [f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, device {runtime.describe()}"
             + (f" ({gpu_name()})" if runtime.device.type == "cuda" else "")
             + f", Python {platform.python_version()}; {len(subjects)} subjects, {sequences.height:,} sequences, "
             f"variant {args.variant}, folds {args.folds if args.folds is not None else 'all'}", "",
             "| configuration | pad | s / epoch | s / fold | epochs run | total s | OOF score (BinF1 / MacroF1) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, pad, epoch_s, fold_s, epochs, score, total in rows:
        lines.append(f"| {name} | {pad} | {epoch_s:.2f} | {fold_s:.1f} | {epochs} | {total:.1f} | {score.score:.4f} "
                     f"({score.binary_f1:.4f} / {score.macro_f1:.4f}) |")
    if len(rows) == 2:
        lines += ["", f"Training time per fold, old / new: {rows[1][3] / rows[0][3]:.1f}x; OOF score new - old: "
                      f"{rows[0][5].score - rows[1][5].score:+.4f}"]
    if oom is not None:
        lines += ["", "| check | how | outcome | verdict | s |", "| --- | --- | --- | --- | --- |",
                  "| " + " | ".join(oom) + " |"]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        ti._atomic_write_text(args.out / "bench_torch.md", report + "\n")


def gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
