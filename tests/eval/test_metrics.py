"""ROUGE-L over any script, BLEU, exact match: hand-worked values."""

from __future__ import annotations

import pytest

from fedtune.eval.metrics import UnicodeTokenizer, exact_match, normalise, rouge_l, score


def test_tokenizer_keeps_non_ascii_text() -> None:
    assert UnicodeTokenizer().tokenize("Ἀθῆναι, Café!") == ["ἀθῆναι", "café"]
    assert UnicodeTokenizer().tokenize("北京是首都") == ["北", "京", "是", "首", "都"]


def test_rouge_l_by_hand() -> None:
    # LCS of "the cat sat on the mat" / "the cat on mat" = 4 tokens; P = 4/4, R = 4/6, F = 0.8
    assert rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)
    # rouge-score's own tokenizer drops these characters and would score 0
    assert rouge_l("北京是首都", "北京是城市") == pytest.approx(0.6)  # LCS 3 of 5 both ways


def test_exact_match_normalises() -> None:
    assert normalise("The  Answer, is: 42.") == "answer is 42"
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("Paris", "Lyon") == 0.0


def test_score_pools_and_checks_lengths() -> None:
    s = score(["a b c d", "x y"], ["a b c d", "z"])
    assert s.n == 2
    assert s.exact_match == 0.5
    assert s.rouge_l == pytest.approx(0.5)  # 1.0 and 0.0
    assert 0.0 < s.bleu < 100.0
    assert score(["same words here ok"], ["same words here ok"]).bleu == pytest.approx(100.0)
    assert score([], []).n == 0
    with pytest.raises(ValueError, match="2 references but 1 answers"):
        score(["a", "b"], ["a"])
