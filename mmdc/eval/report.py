"""Writing one benchmark run: ``results.json``, ``samples.jsonl`` and ``results.md``.

Three files because they serve three readers: ``results.json`` for programs
(the driver's ``eval/<benchmark>/iter_<k>.json``, same format, plots, comparisons),
``samples.jsonl`` for a person asking *why* a score is what it is (the exact
prompt, the raw output, what the parser made of it, right or wrong), and
``results.md`` for pasting next to the paper's tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
TABLE_FILE = "results.md"

# Bookkeeping keys of a metrics dict that are not table columns.
_NOT_COLUMNS = frozenset({"n", "correct", "failed", "unparsed", "unparsed_readable", "unparsed_by_column", "details"})
# Counts shown under a score table, in this order, and what a nonzero one did to the score.
COUNT_KEYS = ("n", "correct", "failed", "unparsed", "unparsed_readable")
COUNT_MEANINGS = {
    "failed": "counted wrong",
    "unparsed": "averaged in as scores (-1, -1), as LLaVA's summarize_gpt_review.py does",
    "unparsed_readable": "of those, replies that give two scores but not on their first line",
}


def table_columns(metrics: Mapping[str, Any]) -> list[str]:
    """The score columns of a benchmark's metrics dict, in its own order (counts and details left out)."""
    return [k for k, v in metrics.items() if k not in _NOT_COLUMNS and (v is None or isinstance(v, (int, float)))]


def format_cell(value: Any, decimals: int = 2) -> str:
    """A table cell: numbers with fixed decimals (the paper's tables), '-' for a missing or NaN score."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{decimals}f}"
    return str(value)


def markdown_table(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any]], label: str = "Model", decimals: int = 2
) -> str:
    """A Markdown table: one row per mapping, first cell its ``label`` entry, then ``columns``."""
    header = "| " + " | ".join([label, *columns]) + " |"
    rule = "|" + "---|" * (len(columns) + 1)
    lines = [header, rule]
    for row in rows:
        cells = [str(row.get(label, ""))] + [format_cell(row.get(c), decimals) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def count_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The counts that qualify a score, one per line, each nonzero one with what it did to the score."""
    lines = []
    for key in COUNT_KEYS:
        if key not in metrics:
            continue
        line = f"{key}: {metrics[key]}"
        if metrics[key] and key in COUNT_MEANINGS:
            line += f" ({COUNT_MEANINGS[key]})"
        if key == "unparsed" and metrics.get("unparsed_by_column"):
            line += "; by column: " + ", ".join(f"{c} {v}" for c, v in metrics["unparsed_by_column"].items())
        lines.append(line)
    return lines


def render_markdown(benchmark: str, metrics: Mapping[str, Any], meta: Mapping[str, Any], decimals: int = 2) -> str:
    """``results.md``: a title, the score table for this model, and the counts that qualify it."""
    columns = table_columns(metrics)
    name = str(meta.get("model_name") or meta.get("checkpoint") or "model")
    text = f"# {benchmark}\n\n" + markdown_table(columns, [{"Model": name, **metrics}], decimals=decimals)
    counts = count_lines(metrics)
    if counts:
        text += "\n" + "".join(f"- {line}\n" for line in counts)
    return text


def results_payload(benchmark: str, metrics: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict:
    """What ``results.json`` holds: the benchmark, its metrics, which of them are table columns, and the run facts."""
    return {
        "benchmark": benchmark,
        "metrics": dict(metrics),
        "columns": table_columns(metrics),
        "meta": dict(meta or {}),
    }


def _results_json(benchmark: str, metrics: Mapping[str, Any], meta: Mapping[str, Any] | None) -> str:
    return json.dumps(results_payload(benchmark, metrics, meta), indent=2, ensure_ascii=False) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    """Temp file then rename: a killed run never leaves a results file that looks complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _jsonl(samples: Sequence[Mapping]) -> str:
    return "".join(json.dumps(dict(sample), ensure_ascii=False) + "\n" for sample in samples)


def write_results(
    out_dir: str | Path,
    benchmark: str,
    metrics: Mapping[str, Any],
    samples: Sequence[Mapping],
    meta: Mapping[str, Any] | None = None,
    decimals: int = 2,
) -> dict[str, Path]:
    """Write the three files into ``out_dir`` (created) and return their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    paths = {"results": out / RESULTS_FILE, "samples": out / SAMPLES_FILE, "table": out / TABLE_FILE}
    _atomic_write(paths["samples"], _jsonl(samples))
    _atomic_write(paths["table"], render_markdown(benchmark, metrics, meta, decimals))
    _atomic_write(paths["results"], _results_json(benchmark, metrics, meta))
    return paths


def write_named_results(
    out_dir: str | Path,
    stem: str,
    benchmark: str,
    metrics: Mapping[str, Any],
    samples: Sequence[Mapping],
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """``<stem>.json`` (results.json format) and ``<stem>.samples.jsonl`` in ``out_dir``: one of many results of a run.

    The samples are written first, so a results file that exists always has its samples beside it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / f"{stem}.json", "samples": out / f"{stem}.samples.jsonl"}
    _atomic_write(paths["samples"], _jsonl(samples))
    _atomic_write(paths["results"], _results_json(benchmark, metrics, meta))
    return paths


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's content; a missing or malformed file is an error naming the file and what it should be."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_results(path: str | Path) -> dict:
    """Load a ``results.json`` (or a file in that format, e.g. ``eval/<benchmark>/iter_<k>.json``)."""
    file = Path(path)
    payload = read_json(file, "results file")
    if not isinstance(payload, dict) or "metrics" not in payload or "benchmark" not in payload:
        raise ValueError(f"{file}: not a results file (needs 'benchmark' and 'metrics')")
    return payload


__all__ = [
    "COUNT_KEYS",
    "COUNT_MEANINGS",
    "count_lines",
    "format_cell",
    "markdown_table",
    "read_results",
    "render_markdown",
    "results_payload",
    "table_columns",
    "write_named_results",
    "write_results",
]
