"""Judge prompts, parsing and scoring rules, with hand-worked verdicts; fedtune judge end to end."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from eval.answers import write_answers
from eval.fake_openai import fake_endpoint, user_text
from fedtune.eval.judge import combine, pair_prompt, parse_rating, parse_verdict, question_text, single_prompt
from fedtune.rundir import RunDir
from helpers import finished_tiny_run, run_cli


def test_parse_rating() -> None:
    assert parse_rating("Clear and right. Rating: [[7]]") == 7.0
    assert parse_rating("It says [[2]] at first... Rating: [[8.5]]") == 8.5  # the last one
    assert parse_rating("Rating: [[11]]") is None  # out of 1-10
    assert parse_rating("Rating: 7") is None  # no brackets: malformed


def test_parse_verdict_and_combine() -> None:
    assert parse_verdict("A is better. [[A]]") == "A"
    assert parse_verdict("tie: [[C]]") == "C"
    assert parse_verdict("assistant A") is None
    assert combine("A", "B") == "win"  # ours first and ours second both won
    assert combine("B", "A") == "loss"
    assert combine("C", "C") == "tie"
    assert combine("A", "A") == "inconsistent"  # position bias: the first answer always wins


def test_prompts_carry_question_answers_and_reference() -> None:
    msgs = single_prompt("What is X?", "an answer", "the reference")
    assert msgs[0]["role"] == "system"
    text = msgs[1]["content"]
    assert "[Question]\nWhat is X?" in text and "an answer" in text and "the reference" in text
    assert '"Rating: [[N]]"' in text
    assert "Reference" not in single_prompt("q", "a", None)[1]["content"]
    pair = pair_prompt("q", "first", "second", None)[1]["content"]
    assert pair.index("first") < pair.index("second") and "[[C]]" in pair


def test_question_text_of_multi_turn_prompts() -> None:
    assert question_text([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]) == "hi"
    multi = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert question_text(multi) == "User: a\nAssistant: b\nUser: c"


def judge_args(run: RunDir, url: str, cache: Path, *extra: str) -> list[str]:
    return ["judge", str(run.path), "--base-url", url, "--model", "judge-m", "--cache", str(cache),
            "--backoff", "0", *extra]  # fmt: skip


def _score_by_answer(body: dict, n: int) -> tuple[int, str]:
    text = user_text(body)
    if "answer zero" in text:
        return 200, "Wrong. Rating: [[2]]"
    if "answer one" in text:
        return 200, "Good. Rating: [[8]]"
    return 200, "I would not rate this."  # malformed: no [[N]]


def test_judge_grades_counts_malformed_and_caches(capsys, tiny_run: RunDir, tmp_path: Path) -> None:
    write_answers(tiny_run, ["answer zero", "answer one", "answer two"])
    with fake_endpoint(_score_by_answer) as fake:
        code, out, err = run_cli(capsys, *judge_args(tiny_run, fake.base_url, tmp_path / "c"))
        assert code == 0, err
        assert len(fake.requests) == 3
        assert fake.requests[0]["model"] == "judge-m" and fake.requests[0]["temperature"] == 0.0
        result = json.loads(tiny_run.judge_single_file.read_text())
        assert result["mean_score"] == 5.0  # (2 + 8) / 2; the malformed one left out
        assert result["counts"]["graded"] == 2 and result["counts"]["malformed"] == 1
        assert result["per_client"] == {"0": {"n": 1, "mean_score": 2.0}, "1": {"n": 1, "mean_score": 8.0}}
        assert result["items"][1]["rationale"] == "Good. Rating: [[8]]"
        assert "mean score: 5.00" in out
        # a re-run asks nothing: every reply comes from the cache
        code, _, err = run_cli(capsys, *judge_args(tiny_run, fake.base_url, tmp_path / "c"))
        assert code == 0, err
        assert len(fake.requests) == 3
        assert json.loads(tiny_run.judge_single_file.read_text())["counts"]["cached"] == 3


def test_judge_pairwise_swaps_positions(capsys, tmp_path: Path) -> None:
    ours, theirs = finished_tiny_run(tmp_path / "fed")[0], finished_tiny_run(tmp_path / "local")[0]
    write_answers(ours, ["good zero", "good one"])
    write_answers(theirs, ["bad zero", "bad one"])

    def script(body: dict, n: int) -> tuple[int, str]:
        text = user_text(body)
        if "question 1?" in text:
            return 200, "The first one. [[A]]"  # position bias on question 1: inconsistent
        first = text.index("[The Start of Assistant A's Answer]")
        return 200, "[[A]]" if "good" in text[first : first + 60] else "[[B]]"

    with fake_endpoint(script) as fake:
        code, out, err = run_cli(
            capsys, *judge_args(ours, fake.base_url, tmp_path / "c", "--against", str(theirs.path))
        )
        assert code == 0, err
        assert len(fake.requests) == 4  # 2 questions x 2 orders
    assert "win rate" in out and "0.750" in out
    result = json.loads(ours.judge_vs_file(theirs.path).read_text())
    counts = result["counts"]
    assert (counts["win"], counts["inconsistent"], counts["loss"]) == (1, 1, 0)
    assert result["win_rate"] == 0.75  # (1 win + 0.5 x 1 inconsistent-as-tie) / 2
    assert result["items"][0]["verdicts"] == ["A", "B"]


def test_judge_all_requests_failing_exits_non_zero(capsys, tiny_run: RunDir, tmp_path: Path) -> None:
    write_answers(tiny_run, ["answer zero", "answer one"])
    with fake_endpoint(lambda body, n: (500, "overloaded")) as fake:
        code, _, err = run_cli(capsys, *judge_args(tiny_run, fake.base_url, tmp_path / "c", "--retries", "2"))
        assert len(fake.requests) == 2 * 3  # each question: 1 try + 2 retries
    assert code == 2
    assert "all 2 requests failed" in err and "HTTP 500" in err
    assert not tiny_run.judge_single_file.exists()


def test_judge_unreachable_endpoint(capsys, tiny_run: RunDir, tmp_path: Path) -> None:
    write_answers(tiny_run, ["answer zero"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    code, _, err = run_cli(capsys, *judge_args(tiny_run, url, tmp_path / "c", "--retries", "1"))
    assert code == 2
    assert "cannot reach" in err and str(port) in err


def test_judge_without_answers_says_what_to_run(capsys, tiny_run: RunDir, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, *judge_args(tiny_run, "http://127.0.0.1:9/v1", tmp_path / "c"))
    assert code == 2
    assert "--generate" in err


@pytest.mark.parametrize("variant", ["base"])
def test_judge_reads_the_chosen_variant(capsys, tiny_run: RunDir, tmp_path: Path, variant: str) -> None:
    write_answers(tiny_run, ["answer one"], variant=variant)
    with fake_endpoint(_score_by_answer) as fake:
        code, _, err = run_cli(
            capsys, *judge_args(tiny_run, fake.base_url, tmp_path / "c", "--variant", variant)
        )
    assert code == 0, err
    assert json.loads(tiny_run.judge_single_file.read_text())["variant"] == variant


def _forgets_the_format(body: dict, n: int) -> tuple[int, str]:
    """A judge that explains but gives no [[N]]; asked to continue its reply, it states the grade."""
    last = body["messages"][-1]
    if body.get("continue_final_message"):
        assert body["add_generation_prompt"] is False and last["role"] == "assistant"
        return 200, "4]] and more" if "answer zero" in user_text(body) else "eleven]]"
    return 200, "The answer is short and vague."


def test_follow_up_continues_a_reply_without_score(capsys, tiny_run: RunDir, tmp_path: Path) -> None:
    write_answers(tiny_run, ["answer zero", "answer one"])
    with fake_endpoint(_forgets_the_format) as fake:
        args = judge_args(tiny_run, fake.base_url, tmp_path / "c", "--follow-up", "--max-tokens", "50")
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
        first, follow = fake.requests[:2], fake.requests[2:]
    assert len(first) == 2 and len(follow) == 2  # each reply continued once, none again
    assert all(r["max_tokens"] == 50 for r in first) and all(r["max_tokens"] == 8 for r in follow)
    # the follow-up is the judge's own reply with the lead, as the begun assistant message
    assert sorted(str(r["messages"][:2]) for r in follow) == sorted(str(r["messages"]) for r in first)
    assert follow[0]["messages"][-1]["content"] == "The answer is short and vague.\n\nRating: [["
    result = json.loads(tiny_run.judge_single_file.read_text())
    assert [i["score"] for i in result["items"]] == [4.0, None]  # "[[eleven]]" parses to nothing
    assert result["items"][0]["followed_up"] == "4]] and more"
    counts = result["counts"]
    assert (counts["followed_up"], counts["graded_after_follow_up"], counts["malformed"]) == (2, 1, 1)


def test_follow_up_off_asks_once(capsys, tiny_run: RunDir, tmp_path: Path) -> None:
    write_answers(tiny_run, ["answer zero"])
    with fake_endpoint(_forgets_the_format) as fake:
        code, _, err = run_cli(capsys, *judge_args(tiny_run, fake.base_url, tmp_path / "c"))
        assert code == 0, err
        assert len(fake.requests) == 1 and "continue_final_message" not in fake.requests[0]
    assert json.loads(tiny_run.judge_single_file.read_text())["counts"]["malformed"] == 1


def test_follow_up_of_pairwise_verdicts(capsys, tmp_path: Path) -> None:
    ours, theirs = finished_tiny_run(tmp_path / "fed")[0], finished_tiny_run(tmp_path / "local")[0]
    write_answers(ours, ["good zero"])
    write_answers(theirs, ["bad zero"])

    def script(body: dict, n: int) -> tuple[int, str]:
        if not body.get("continue_final_message"):
            text = user_text(body)
            first = text.index("[The Start of Assistant A's Answer]")
            return 200, "Both try." if "good" in text[first : first + 60] else "The second is better. [[B]]"
        assert body["messages"][-1]["content"] == "Both try.\n\nVerdict: [["
        return 200, "A]]"

    with fake_endpoint(script) as fake:
        args = judge_args(ours, fake.base_url, tmp_path / "c", "--against", str(theirs.path), "--follow-up")
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
        assert len(fake.requests) == 3  # two orders, one continued
    result = json.loads(ours.judge_vs_file(theirs.path).read_text())
    assert result["items"][0]["verdicts"] == ["A", "B"] and result["items"][0]["outcome"] == "win"
    assert result["items"][0]["followed_up"] == ["A]]", None]
    assert result["counts"]["followed_up"] == 1


def test_judge_sends_the_key_from_the_named_env_var(
    capsys, monkeypatch, tiny_run: RunDir, tmp_path: Path
) -> None:
    write_answers(tiny_run, ["answer one"])
    monkeypatch.setenv("FEDTUNE_TEST_JUDGE_KEY", "s3cret")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with fake_endpoint(_score_by_answer) as fake:
        args = judge_args(tiny_run, fake.base_url, tmp_path / "c", "--api-key-env", "FEDTUNE_TEST_JUDGE_KEY")
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
        code, _, err = run_cli(capsys, *judge_args(tiny_run, fake.base_url, tmp_path / "c2"))
        assert code == 0, err
    assert fake.authorization == ["Bearer s3cret", None]  # the default variable, OPENAI_API_KEY, is unset
