"""Bad input: one clear error naming the file/line/key, exit code 2, no run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli

cli = run_cli


def _alpaca(path: Path, n: int = 12) -> Path:
    rows = [
        {"instruction": f"say {i}", "input": "", "output": f"{i}", "category": f"c{i % 3}"} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(capsys, tmp_path: Path, *overrides: str) -> tuple[int, str]:
    out = tmp_path / "runs"
    code, _, err = cli(
        capsys,
        "run",
        "--config",
        "configs/tiny.toml",
        "--set",
        f"run.output_dir='{out}'",
        "--no-progress",
        *[x for o in overrides for x in ("--set", o)],
    )
    assert not out.exists() or not any(out.iterdir()), "a run directory was left behind"
    return code, err


def test_malformed_jsonl_line_names_file_and_line(capsys, tmp_path: Path) -> None:
    data = _alpaca(tmp_path / "d.jsonl")
    lines = data.read_text().splitlines()
    lines[4] = '{"instruction": "broken"'
    data.write_text("\n".join(lines) + "\n")
    code, err = _run(capsys, tmp_path, f"data.source='{data}'", "data.format='alpaca'")
    assert code == 2
    assert "d.jsonl:5" in err


def test_missing_field_names_record(capsys, tmp_path: Path) -> None:
    data = _alpaca(tmp_path / "d.jsonl")
    lines = data.read_text().splitlines()
    lines[2] = json.dumps({"instruction": "no output here"})
    data.write_text("\n".join(lines) + "\n")
    code, err = _run(capsys, tmp_path, f"data.source='{data}'", "data.format='alpaca'")
    assert code == 2
    assert "d.jsonl:3" in err and "output" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.format='yaml-ish'", "data.format"),
        ("data.template='mystery'", "mystery"),
        ("partition.name='by-moon'", "partition.name"),
        ("model.name='/no/such/model'", "model.name"),
        ("model.lora.r=0", "model.lora.r"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.max_target_length=-3", "data.max_target_length"),
        ("fed.strategy='fedmagic'", "fed.strategy"),
        ("fed.min_train_replies=4", "fed.min_train_replies=4"),  # 3 clients: a quorum never met
        ("fed.round_timeout=0", "fed.round_timeout"),
        # the server would wait for a third client that never comes
        (
            "simulation.num_supernodes=2",
            "simulation.num_supernodes=2 is fewer than partition.num_partitions=3",
        ),
    ],
)
def test_bad_settings(capsys, tmp_path: Path, override: str, message: str) -> None:
    data = _alpaca(tmp_path / "d.jsonl")
    extra = [f"data.source='{data}'", "data.format='alpaca'"] if "format" in override else []
    code, err = _run(capsys, tmp_path, *extra, override)
    assert code == 2
    assert message in err


def test_bad_override_names_the_override(capsys, tmp_path: Path) -> None:
    code, err = _run(capsys, tmp_path, "fed.rounds=0")

    assert code == 2
    assert "--set fed.rounds=0: fed.rounds: Input should be greater than 0" in err
    assert "tiny.toml" not in err


def test_bad_value_in_the_config_file_names_the_file(capsys, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("extends = '{}'\n[fed]\nrounds = 0\n".format(Path("configs/tiny.toml").resolve()))

    code, _, err = cli(capsys, "run", "--config", str(config), "--set", "fed.strategy='fedavg'")

    assert code == 2
    assert f"{config}: fed.rounds: Input should be greater than 0" in err


def test_blank_answer_names_the_record(capsys, tmp_path: Path) -> None:
    data = _alpaca(tmp_path / "d.jsonl")
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({"instruction": "say 3", "input": "", "output": "", "category": "c0"})
    data.write_text("\n".join(lines) + "\n")

    code, err = _run(capsys, tmp_path, f"data.source='{data}'", "data.format='alpaca'")

    assert code == 2
    assert f"{data}:4: message 1 (an assistant answer) is blank" in err


def test_record_without_category_names_its_line(capsys, tmp_path: Path) -> None:
    data = _alpaca(tmp_path / "d.jsonl")
    lines = data.read_text().splitlines()
    lines[6] = json.dumps({"instruction": "say 6", "input": "", "output": "6"})
    data.write_text("\n".join(lines) + "\n")

    code, err = _run(capsys, tmp_path, f"data.source='{data}'", "data.format='alpaca'")

    assert code == 2
    assert f"{data}:7: field 'category' is missing or blank; partition.name='category'" in err


def test_empty_client_partition(capsys, tmp_path: Path) -> None:
    data = _alpaca(tmp_path / "d.jsonl", n=12)
    code, err = _run(
        capsys,
        tmp_path,
        f"data.source='{data}'",
        "data.format='alpaca'",
        "partition.name='shards'",
        "partition.num_partitions=3",
        "partition.shards_per_client=5",
    )
    assert code == 2
    assert "partition" in err


def test_missing_data_file(capsys, tmp_path: Path) -> None:
    code, err = _run(capsys, tmp_path, f"data.source='{tmp_path / 'nope.jsonl'}'", "data.format='alpaca'")
    assert code == 2 and "nope.jsonl" in err


def test_missing_config_file(capsys, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "run", "--config", str(tmp_path / "none.toml"))
    assert code == 2 and "none.toml" in err


def test_partition_prints_clients_by_categories(capsys) -> None:
    code, out, _ = cli(capsys, "partition", "--config", "configs/tiny.toml")
    assert code == 0
    assert "client 0" in out and "client 2" in out and "total" in out


def test_data_convert_alpaca_to_chatglm(capsys, tmp_path: Path) -> None:
    src = _alpaca(tmp_path / "a.jsonl", n=3)
    dst = tmp_path / "g.jsonl"
    code, out, _ = cli(capsys, "data", "convert", str(src), str(dst), "--from", "alpaca", "--to", "chatglm")
    assert code == 0 and "wrote 3 records" in out
    first = json.loads(dst.read_text().splitlines()[0])
    assert first["prompt"] == "say 0" and first["response"] == "0"


def test_data_convert_error_writes_nothing(capsys, tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "z"}\n')
    dst = tmp_path / "g.jsonl"
    code, _, err = cli(capsys, "data", "convert", str(src), str(dst), "--from", "alpaca", "--to", "chatglm")
    assert code == 2 and "a.jsonl:2" in err
    assert not dst.exists()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["split.n_head=0"], "split.n_head"),
        (["split.port=seventy"], "split.port"),
        (["split.nhead=1"], "split.nhead"),
        (["split.tls_cert='no.pem'", "split.tls_key='k'", "split.tls_root_cert='ca'"], "split.tls_cert"),
    ],
)
def test_serve_trunk_bad_setting_names_the_key(capsys, overrides: list[str], key: str) -> None:
    code, _, err = cli(capsys, "serve-trunk", *[x for o in overrides for x in ("--set", o)])
    assert code == 2 and key in err
