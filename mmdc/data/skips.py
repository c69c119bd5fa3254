"""How much bad input a run tolerates: a few bad records or images are skipped, a wrong file or folder stops the run.

A corpus of 558K caption pairs has a few broken files; skipping them (each one recorded in ``skipped.jsonl``)
is right. A wrong ``data.image_folder`` makes *every* image "missing", and skipping them row by row would
train on nothing. ``data.max_skip_ratio`` is the line between the two.
"""

from __future__ import annotations

from dataclasses import dataclass


class TooMuchBadInput(ValueError):
    """More of an input was unusable than ``data.max_skip_ratio`` allows; names what, how much and the first reason."""

    def __init__(self, what: str, bad: int, total: int, limit: float, first: str) -> None:
        super().__init__(
            f"{bad} of {total} {what} ({bad / total:.1%}) cannot be used, more than data.max_skip_ratio={limit:g} "
            f"allows; the first: {first}. Every one is in skipped.jsonl. Check the file or folder the config names, "
            f"or raise data.max_skip_ratio to go on without them"
        )
        self.what, self.bad, self.total, self.limit, self.first = what, bad, total, limit, first

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.what, self.bad, self.total, self.limit, self.first)


@dataclass(frozen=True)
class SkipCount:
    """``bad`` of ``total`` ``what`` (e.g. "images under data.image_folder=/x") were skipped; ``first`` says why."""

    what: str
    bad: int
    total: int
    first: str = ""

    @property
    def ratio(self) -> float:
        return self.bad / self.total if self.total else 0.0


def check_skip_ratio(counts: list[SkipCount], limit: float) -> None:
    """Raise ``TooMuchBadInput`` for the first count whose share of skipped items is above ``limit``."""
    for count in counts:
        if count.ratio > limit:
            raise TooMuchBadInput(count.what, count.bad, count.total, limit, count.first)
