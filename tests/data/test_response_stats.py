"""Response figures (data/response_stats.py), each against a hand count."""

from __future__ import annotations

import pytest

from opsd_megatron.data.response_stats import (
    marker_count,
    percentile_nearest_rank,
    repetition_rate,
    response_stats,
)


def test_repetition_rate_counts_word_4grams_seen_before_in_the_same_text():
    assert repetition_rate("a b c d e f") == 0.0
    # grams: (a b c d) (b c d a) (c d a b) (d a b c) (a b c d)*: 1 of 5 repeated
    assert repetition_rate("a b c d a b c d") == pytest.approx(1 / 5)
    assert repetition_rate("x x x x x x") == pytest.approx(2 / 3)  # 3 grams, 2 repeats
    assert repetition_rate("too short") == 0.0


def test_markers_are_whole_words_case_insensitive_and_span_spaces():
    text = "Wait, maybe 3. Hmm... let me  check: awaiting maybes. ACTUALLY yes; Let me\ncheck."
    assert marker_count(text) == 6  # Wait, maybe, Hmm, let me  check, ACTUALLY, Let me\ncheck
    assert marker_count(text, ["awaiting"]) == 1
    assert marker_count("no markers here", []) == 0


def test_p90_is_the_nearest_rank():
    assert percentile_nearest_rank(list(range(1, 11)), 0.9) == 9
    assert percentile_nearest_rank([5], 0.9) == 5
    assert percentile_nearest_rank(list(range(1, 12)), 0.9) == 10  # ceil(9.9) = 10th


def test_response_stats_of_a_small_set():
    texts = ["wait 1 2 3 1 2 3", "answer 7", "maybe maybe"]
    lengths, truncated = [20, 5, 15], [True, False, False]
    got = response_stats(texts, lengths, truncated)
    assert got["response_length"] == pytest.approx(40 / 3)
    assert got["response_length_p90"] == 20
    assert got["truncation_rate"] == pytest.approx(1 / 3)
    # text 1: grams (w 1 2 3) (1 2 3 1) (2 3 1 2) (3 1 2 3): none repeated; others too short
    assert got["repetition_rate"] == 0.0
    assert got["marker_rate"] == pytest.approx(1000 * 3 / 40)
    with pytest.raises(ValueError, match="differ in length"):
        response_stats(texts, lengths[:2], truncated)
