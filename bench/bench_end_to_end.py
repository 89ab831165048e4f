"""End to end: the main job (every family, both routes, 5 folds, ensemble, inference) with its stage breakdown.

    python bench/bench_end_to_end.py                  # the default run: demo synthetic set
    python bench/bench_end_to_end.py --size full      # the `full` synthetic set (81 + 10 subjects)
    python bench/bench_end_to_end.py --report DIR     # the tables of a run already made into DIR
    python bench/bench_end_to_end.py --size full --out DIR   # also write the tables to DIR/bench_end_to_end.md
    python bench/bench_end_to_end.py --data-dir DIR --folds 2   # any competition-format folder (tests use a tiny one)

The job runs as the README runs it, `python train_infer.py --synthetic ...`, in a child process with this
process's environment (so DL_EPOCHS, KERAS_BACKEND, ... apply), into a fresh output folder: the synthetic
set, the frame-feature store and every model are made inside the timed run. Printed: the machine line; the
stage table (seconds and share of the total, from the run's run_summary.json, plus the child's wall-clock
time with interpreter start and imports, and its peak memory); the out-of-fold table (families, then the
ensemble rows); and, per route, whether the ensemble's held-out score beats the best single family.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"


def device_line() -> str:
    """The machine, with the GPU when torch sees one (the run decides epochs and precision by it)."""
    line = (f"{platform.platform()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}")
    try:
        import torch
        if torch.cuda.is_available():
            line += f", GPU {torch.cuda.get_device_name(0)}"
        line += f", torch {torch.__version__}"
    except ImportError:
        pass
    return line


def run_job(size: str, output_dir: Path, extra_args: list[str], data_dir: Path | None = None) -> tuple[float, float]:
    """(wall-clock seconds, peak RSS of the child in GiB) of one main-job run into a fresh folder."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    data = ["--data-dir", str(data_dir)] if data_dir else ["--synthetic", "--synthetic-size", size]
    command = [sys.executable, str(ROOT / "train_infer.py"), *data, "--output-dir", str(output_dir), *extra_args]
    print("Running:", " ".join(command), flush=True)
    started = time.perf_counter()
    log_path = output_dir.with_name(output_dir.name + ".log")                  # beside the run folder
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise SystemExit(f"the main job failed with exit code {code}; last lines of {log_path}:\n" + "\n".join(tail))
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20     # Linux: KiB
    return seconds, peak_gib


def stage_rows(summary: dict) -> list[tuple[str, float]]:
    """Stages in run order; the families' stages are named '<family> <route>'."""
    return list(summary["stage_seconds"].items())


def print_report(summary: dict, wall: float | None, peak_gib: float | None) -> None:
    total = summary["total_seconds"]
    print(f"\nMachine: {device_line()}\n")
    print("| stage | seconds | share |\n| --- | ---: | ---: |")
    for stage, seconds in stage_rows(summary):
        print(f"| {stage} | {seconds:.1f} | {seconds / total:.0%} |")
    print(f"| **total (run)** | **{total:.1f}** | 100% |")
    if wall is not None:
        print(f"| wall clock incl. interpreter start and imports | {wall:.1f} | |")
    if peak_gib is not None:
        print(f"| peak memory (RSS of the largest process) | {peak_gib:.2f} GiB | |")
    inference = summary.get("inference", {})
    if inference.get("predict_ms_p50") is not None:
        print(f"\npredict(): {inference.get('sequences', '?')} test sequences, first call "
              f"{inference['predict_ms_first']:.0f} ms (loads models), p50 {inference['predict_ms_p50']:.1f} ms, "
              f"p95 {inference['predict_ms_p95']:.1f} ms")

    rows = summary.get("summary", [])
    print("\n| family | route | n scored | OOF score | BinF1 | MacroF1 | best iter/epoch | train s | note |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        print(f"| {r['family']} | {r['route']} | {r['n_scored']} | {cell(r['oof_score'], '.4f')} | "
              f"{cell(r['binary_f1'], '.4f')} | {cell(r['macro_f1'], '.4f')} | "
              f"{cell(r['mean_best_iteration'], '.1f')} | {cell(r['train_seconds'], '.1f')} | {r.get('note', '')} |")
    print()
    for route in ("imu", "full"):
        singles = [r for r in rows if r["route"] == route and r["family"] not in ("ensemble", "per-subject")
                   and r["oof_score"] is not None]
        ensemble = next((r for r in rows if r["route"] == route and r["family"] == "ensemble"), None)
        if not singles or ensemble is None:
            continue
        best = max(singles, key=lambda r: r["oof_score"])
        margin = ensemble["oof_score"] - best["oof_score"]
        verdict = "above" if margin > 0 else "NOT above"
        print(f"route {route}: ensemble {ensemble['oof_score']:.4f} vs best single family {best['family']} "
              f"{best['oof_score']:.4f} -> {margin:+.4f} ({verdict})")
    access = summary.get("deep_frame_access")
    if access:
        share = "-" if access["share"] is None else f"{access['share']:.2%}"
        print(f"deep-model frame access: {access['build_seconds'] + access['fold_slice_seconds']:.2f} s (arrays built "
              f"once {access['build_seconds']:.2f} s, fold slices {access['fold_slice_seconds']:.2f} s) = {share} of the "
              f"deep families' {access['deep_training_seconds']:.0f} s; lookups after the build: "
              f"{access['lookups_after_build']}")
    synthetic = summary.get("inference", {}).get("synthetic_test", {})
    for route, s in synthetic.items():
        print(f"synthetic hold-out test, {route}: {s['n']} sequences, score {s['score']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("demo", "full"), default="demo", help="synthetic set size")
    parser.add_argument("--output-dir", type=Path, help="run folder (default bench/.cache/e2e_<size>; emptied first)")
    parser.add_argument("--report", type=Path, metavar="DIR", help="only print the tables of the run in DIR")
    parser.add_argument("--data-dir", type=Path, help="competition-format data instead of a synthetic set")
    parser.add_argument("--out", type=Path, metavar="DIR", help="also write the tables to DIR/bench_end_to_end.md")
    args, extra = parser.parse_known_args()
    if args.report is not None:
        path = args.report / "run_summary.json"
        if not path.is_file():
            raise SystemExit(f"--report {args.report}: no run_summary.json there")
        summary, wall, peak = json.loads(path.read_text(encoding="utf-8")), None, None
    else:
        output_dir = args.output_dir or CACHE / f"e2e_{args.size}"
        wall, peak = run_job(args.size, output_dir, extra, args.data_dir)
        summary = json.loads((output_dir / "run_summary.json").read_text(encoding="utf-8"))
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        print_report(summary, wall, peak)
    print(report.getvalue(), end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_end_to_end.md").write_text(report.getvalue(), encoding="utf-8")


if __name__ == "__main__":
    main()
