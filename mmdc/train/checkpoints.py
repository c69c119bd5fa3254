"""Resumable training state: where it lives, what it must match, and how each rank saves and restores it.

Every ``checkpoint_every_steps`` optimizer steps each rank writes its part of the state (the strategy's
own checkpoint, plus per rank the step counters and RNG states) into ``<output_dir>.train_state/step_<n>/``;
rank 0 then writes ``latest.json`` after a barrier, so the marker only ever names a complete state. Our
own folder, not ``ray.train.report(checkpoint=...)``: a report is a barrier that also copies the whole
state into ``storage_path`` (about 100 GB for a 7B full tune), while ``output_dir`` is already on storage
every worker shares. A state is resumed only when ``resume_fingerprint`` matches; steps after the last
saved state are trained again (and appear twice in the metrics file; the later lines count).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mmdc.config import TrainConfig

SUMMARY_FILE = "train_summary.json"  # written beside the final weights by rank 0
STATE_SUFFIX = ".train_state"  # <output_dir>.train_state/ holds the resumable state while training runs
STATE_MARKER = "latest.json"  # names the latest complete state; written last
# TrainConfig keys that may change between an interrupted attempt and its resume (they do not change what the
# saved state means); every other key, and the data size, must match.
RESUME_FREE_KEYS = ("enabled", "checkpoint_every_steps", "cpus_per_worker", "gpus_per_worker")
TRAINING_SECTIONS = ("align", "tune", "models", "data")  # a forced change here invalidates saved training state


class Stateful(Protocol):
    """What a strategy offers the state folder: write and read its own part under ``root/tag``."""

    def save_state(self, root: Path, tag: str, rank: int) -> None: ...

    def load_state(self, root: Path, tag: str) -> None: ...


def stale_training_keys(changed: list[str]) -> list[str]:
    """The dotted config keys among ``changed`` that make a saved training state or checkpoint stale."""

    def stale(key: str) -> bool:
        section, _, rest = key.partition(".")
        if section in ("align", "tune"):
            return rest.split(".")[0] not in RESUME_FREE_KEYS
        return section in TRAINING_SECTIONS or key == "run.seed"

    return [key for key in changed if stale(key)]


def train_state_dir(output_dir: str | os.PathLike) -> Path:
    """Where resumable state for ``output_dir`` lives: a sibling, so ``output_dir`` only holds a final checkpoint."""
    out = Path(output_dir).resolve()
    return out.with_name(out.name + STATE_SUFFIX)


def read_train_state(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of the latest complete saved state for ``output_dir`` (``step``, ``epoch``, ...), or None."""
    marker = train_state_dir(output_dir) / STATE_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def resume_fingerprint(
    stage: str, init_checkpoint: str, seed: int, num_rows: int, total_steps: int, cfg: TrainConfig
) -> dict[str, Any]:
    """What must be equal for a saved state to be resumed: the same start, data size and training setup."""
    train = {f"train.{k}": v for k, v in asdict(cfg).items() if k not in RESUME_FREE_KEYS}
    return {
        "stage": stage,
        "init_checkpoint": str(init_checkpoint),
        "seed": seed,
        "num_rows": num_rows,
        "total_steps": total_steps,
        **train,
    }


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every fingerprint key that differs (JSON-normalised, so lists equal tuples)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]


def prepare_state(state_dir: Path, fingerprint: dict[str, Any], resume: bool) -> int:
    """The step a resume continues after (0: fresh start). Refuses a state saved by a different setup."""
    marker = state_dir / STATE_MARKER
    if not resume or not marker.exists():
        shutil.rmtree(state_dir, ignore_errors=True)  # nothing usable: no half-written leftovers either
        return 0
    saved = json.loads(marker.read_text())
    diff = resume_mismatch(saved["fingerprint"], fingerprint)
    if diff:
        raise ValueError(
            f"{state_dir} holds training state from a different setup ({'; '.join(diff)}); "
            "delete it or call with resume=False to start over"
        )
    return int(saved["step"])


@dataclass
class Progress:
    """Where training stands; each rank saves its copy with every resumable state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being trained
    micro_in_epoch: int = 0  # micro batches of that epoch consumed so far
    micro_steps: int = 0  # micro batches over all epochs (this rank)
    empty: int = 0  # zero-weight placeholder micro batches (this rank)
    dropped: int = 0  # samples dropped by formatting (this rank)
    samples: int = 0  # supervised samples, summed over ranks
    tokens: int = 0  # tokens of those samples, summed over ranks
    first_loss: float | None = None
    last_loss: float | None = None
    elapsed_s: float = 0.0  # training wall time, earlier attempts included
    resumed_from: int = 0  # step the current attempt started after (0: from init_checkpoint)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainState:
    """``<output_dir>.train_state/``: ``step_<n>/`` (strategy state, one ``rank_<r>.pt`` per rank), ``latest.json``."""

    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        self.root, self.fingerprint = root, fingerprint

    def save(self, strategy: Stateful, progress: Progress, rank: int) -> None:
        """Every rank writes its part; rank 0 then points ``latest.json`` at it and drops older states."""
        import torch
        import torch.distributed as dist

        tag = f"step_{progress.step:08d}"
        strategy.save_state(self.root, tag, rank)
        (self.root / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"progress": asdict(progress), "rng": _rng_state()}, self.root / tag / f"rank_{rank}.pt")
        dist.barrier()  # every rank's files are on disk before the marker names them
        if rank == 0:
            marker = {
                "tag": tag,
                "step": progress.step,
                "epoch": progress.epoch,
                "micro_in_epoch": progress.micro_in_epoch,
                "fingerprint": self.fingerprint,
            }
            tmp = self.root / (STATE_MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=1))
            os.replace(tmp, self.root / STATE_MARKER)
            for old in self.root.glob("step_*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)

    def restore(self, strategy: Stateful, rank: int) -> Progress:
        """The saved progress with weights, optimizer, schedule and RNG restored; a fresh one without a state."""
        import torch

        marker = self.root / STATE_MARKER
        if not marker.exists():
            return Progress()
        tag = json.loads(marker.read_text())["tag"]
        strategy.load_state(self.root, tag)
        saved = torch.load(self.root / tag / f"rank_{rank}.pt", weights_only=False)  # our own file
        _set_rng_state(saved["rng"])
        progress = Progress(**saved["progress"])
        progress.resumed_from = progress.step
        return progress
