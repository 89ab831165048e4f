"""What every bench script shares: the import of train_infer, a timer, the cached `full` synthetic set."""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT))
import train_infer as ti  # noqa: E402


def timed(fn, *args, **kwargs):
    """(fn's result, wall-clock seconds)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def full_synthetic_dir(cache: Path = CACHE) -> Path:
    """The `full` synthetic set (81 + 10 subjects), generated once and reused while its manifest matches."""
    n_train, n_test = ti.SYNTHETIC_SIZES["full"]
    return ti.generate_synthetic_competition_data(cache / "full", n_train, n_test, 42)


def print_stage_table(rows: list[tuple[str, str, str]], libraries: str) -> None:
    """The machine line, then a Markdown table of (stage, time, notes) rows, as pasted into the README."""
    import os
    import platform
    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
          f"Python {platform.python_version()}, {libraries}\n")
    print("| stage | time | notes |\n| --- | --- | --- |")
    for stage, value, note in rows:
        print(f"| {stage} | {value} | {note} |")
