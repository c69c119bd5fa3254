"""The training progress line (reads like a bar in the job log) and the per-step metrics file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m05s`` / ``7s``: short enough for a progress line."""
    s = max(int(round(seconds)), 0)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def eta_seconds(steps_done: int, seconds_spent: float, steps_left: int) -> float | None:
    """Remaining time at this attempt's pace; None before its first step (no pace yet)."""
    if steps_done <= 0:
        return None
    return seconds_spent / steps_done * max(steps_left, 0)


def progress_line(
    run: str,
    step: int,
    total: int,
    elapsed_s: float,
    eta_s: float | None,
    epoch: int,
    loss: float,
    lr: float,
    samples_per_s: float,
    tokens_per_s: float,
    width: int = 20,
) -> str:
    """One log line that reads like a progress bar: bar, step i/N, percent, elapsed, ETA, then the numbers."""
    frac = min(step / total, 1.0) if total > 0 else 1.0
    filled = int(frac * width)
    bar = "#" * filled + "-" * (width - filled)
    eta = format_duration(eta_s) if eta_s is not None else "?"
    return (
        f"[{run}] [{bar}] step {step}/{total} {100 * frac:5.1f}% | {format_duration(elapsed_s)} elapsed, "
        f"ETA {eta} | epoch {epoch} loss {loss:.4f} lr {lr:.2e} | {samples_per_s:.1f} samples/s "
        f"{tokens_per_s:.0f} tok/s"
    )


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line (the run's ``metrics.jsonl``: one line per optimizer step)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
