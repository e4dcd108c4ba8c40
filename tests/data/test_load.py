"""Tests for fedtune.data.load: local readers, error positions, conversion, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from fedtune.data.load import convert_file, load_conversations, read_records, write_records
from fedtune.data.partition import partition_dataset
from fedtune.errors import FedtuneError

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "hi", "category": "greet"},
    {"instruction": "Add", "input": "1 2", "output": "3", "category": "math"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl(tmp_path: Path) -> None:
    ds = read_records(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))

    assert ds.to_list() == ROWS


def test_json_array_and_json_lines_in_a_json_file(tmp_path: Path) -> None:
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    lines = write_jsonl(tmp_path / "l.json", ROWS)

    assert read_records(str(array)).to_list() == ROWS
    assert read_records(str(lines)).to_list() == ROWS


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output,category\nSay hi,,hi,greet\nAdd,1 2,3,math\n", encoding="utf-8")

    assert read_records(str(path)).to_list() == ROWS


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))

    assert read_records(str(path)).to_list() == ROWS


def test_malformed_jsonl_reports_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    # line 1 record, line 2 blank (skipped, still counted), line 3 broken
    path.write_text(json.dumps(ROWS[0]) + "\n\n{'instruction': 1}\n", encoding="utf-8")

    with pytest.raises(FedtuneError, match=rf"^{path}:3: invalid JSON \("):
        read_records(str(path))


def test_malformed_json_reports_decoder_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]\n', encoding="utf-8")

    with pytest.raises(FedtuneError, match=rf"^{path}:3: invalid JSON"):
        read_records(str(path))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")

    with pytest.raises(FedtuneError, match=r"nope.jsonl: no such file"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FedtuneError, match=r"empty.jsonl: the file holds no records"):
        read_records(str(empty))


def test_non_object_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text('[{"a": 1}, 5]', encoding="utf-8")

    with pytest.raises(FedtuneError, match=r"list.json: record 1: a record must be a JSON object"):
        read_records(str(path))


def test_unloadable_hub_name_says_what_is_expected() -> None:
    with pytest.raises(
        FedtuneError, match=r"could not load dataset 'no-such-org/no-such-set'.*built-in name"
    ):
        read_records("no-such-org/no-such-set")


def test_load_conversations_keeps_category(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)

    ds = load_conversations(str(path), "alpaca")

    assert ds.column_names == ["messages", "category", "where"]
    assert ds["category"] == ["greet", "math"]
    assert ds["where"] == [f"{path}:1", f"{path}:2"]
    assert ds[1]["messages"] == [
        {"role": "user", "content": "Add\n\n1 2"},
        {"role": "assistant", "content": "3"},
    ]


def test_load_conversations_error_names_jsonl_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], {"instruction": "x"}])

    with pytest.raises(FedtuneError, match=rf"^{path}:3: missing field 'output'"):
        load_conversations(str(path), "alpaca")


def test_category_partition_names_the_line_of_a_record_without_category(tmp_path: Path) -> None:
    # Prepare: line 2 has no category and line 3 a blank one
    rows = [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "category"}, {**ROWS[1], "category": " "}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_conversations(str(path), "alpaca")

    with pytest.raises(FedtuneError, match=rf"^{path}:2: field 'category' is missing or blank; .*\(2 of 3"):
        partition_dataset(ds, name="category", num_partitions=1)


def test_load_conversations_refuses_a_blank_row_naming_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"instruction": "", "input": "", "output": ""}])

    with pytest.raises(FedtuneError, match=rf"^{path}:2: the record is empty \(every message is blank\)$"):
        load_conversations(str(path), "alpaca")


def test_load_conversations_refuses_a_blank_answer_in_a_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nSay hi,,hi\nAdd,1 2,\n", encoding="utf-8")

    with pytest.raises(FedtuneError, match=rf"^{path}: record 1: message 1 \(an assistant answer\) is blank"):
        load_conversations(str(path), "alpaca")


def test_load_conversations_error_names_record_index_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], {"instruction": "x"}]), encoding="utf-8")

    with pytest.raises(FedtuneError, match=rf"^{path}: record 1: missing field 'output'"):
        load_conversations(str(path), "alpaca")


def test_builtin_ignores_format() -> None:
    ds = load_conversations("chatterbot", "no-such-format")

    assert ds.column_names == ["messages", "category", "where"]
    assert ds["where"][:2] == ["chatterbot record 0", "chatterbot record 1"]
    assert len(ds) > 1000


def test_write_records_json_and_jsonl(tmp_path: Path) -> None:
    assert write_records(ROWS, tmp_path / "sub" / "o.jsonl") == 2
    assert write_records(ROWS, tmp_path / "o.json") == 2

    assert [json.loads(line) for line in (tmp_path / "sub" / "o.jsonl").read_text().splitlines()] == ROWS
    assert json.loads((tmp_path / "o.json").read_text()) == ROWS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json", "sub"]  # no temp file left


def test_write_records_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match=r"o.csv: cannot write '.csv' files"):
        write_records(ROWS, tmp_path / "o.csv")


def test_convert_file_alpaca_to_chatglm(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)

    count = convert_file(str(src), "alpaca", tmp_path / "out.jsonl", "chatglm")

    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert count == 2
    assert json.loads(lines[1]) == {
        "prompt": "Add\n\n1 2",
        "response": "3",
        "history": [],
        "category": "math",
    }


def test_convert_file_with_explain(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Q", "output": "R", "explanation": "E"}])

    convert_file(str(src), "alpaca", tmp_path / "out.json", "openai", explain=True)

    [record] = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert record["messages"][-1] == {"role": "assistant", "content": "EXPLAIN: E\nCONCLUSION: R"}


def test_convert_file_writes_nothing_on_error(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
        + "\n"
        + json.dumps({"conversations": [{"from": v, "value": v} for v in ("human", "gpt", "human", "gpt")]})
        + "\n",
        encoding="utf-8",
    )
    dst = tmp_path / "out.jsonl"
    dst.write_text("old\n", encoding="utf-8")

    with pytest.raises(FedtuneError, match=rf"^{src}:2: format 'alpaca' holds one round"):
        convert_file(str(src), "sharegpt", dst, "alpaca")

    assert dst.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
