"""`fedtune run` with client-level DP through Flower's simulation runtime: ε everywhere, exact resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedtune import launch
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.privacy.accounting import Ledger
from helpers import run_cli
from test_e2e import resume_after_round_1, same_adapter, tiny_run

pytestmark = pytest.mark.integration

DP = (
    "privacy.dp=true",
    "privacy.sampling='fixed'",
    "privacy.noise_multiplier=1.0",
    "privacy.clip_norm=0.5",
    "fed.fraction_train=0.67",
)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("dp"), *DP)


def test_epsilon_is_in_every_round_line_the_report_and_final(dp_run: Path) -> None:
    lines = [json.loads(x) for x in (dp_run / "metrics.jsonl").read_text().splitlines()]
    server = [r for r in lines if r["phase"] == "server" and r["round"] > 0]
    train = [r for r in lines if r["phase"] == "train"]
    assert [r["round"] for r in server] == [1, 2]
    assert all(r["num_clients"] == 2 for r in server)  # floor(0.67 · 3) of 3, every round
    assert {r["round"] for r in train} == {1, 2} and len(train) == 4
    ledger = Ledger(3, 1 / 3**1.1, sampling="fixed", accountant="rdp")
    for r in server:
        ledger.compose(1.0, 2)
        assert r["epsilon"] == pytest.approx(ledger.epsilon())
        assert r["noise_multiplier"] == 1.0 and r["clip_norm"] == 0.5 and r["noise_to_signal"] > 0
    privacy = json.loads((dp_run / "final" / "privacy.json").read_text())
    assert privacy["epsilon"] == pytest.approx(server[-1]["epsilon"])
    assert privacy["rounds_accounted"] == 2 and privacy["delta"] == pytest.approx(1 / 3**1.1)
    assert (dp_run / "report" / "privacy.png").is_file()


def test_the_run_stops_cleanly_before_a_round_would_pass_the_target(tmp_path: Path) -> None:
    ledger = Ledger(3, 1 / 3**1.1, sampling="fixed", accountant="rdp")
    ledger.compose(1.0, 2)
    one_round = ledger.epsilon()  # a target between one round's ε and two rounds'
    run = tiny_run(tmp_path, *DP, f"privacy.target_epsilon={one_round * 1.05}")
    assert json.loads((run / "state.json").read_text())["last_round"] == 1
    assert "privacy budget" in json.loads((run / "state.json").read_text())["stopped"]
    privacy = json.loads((run / "final" / "privacy.json").read_text())
    assert privacy["rounds_accounted"] == 1 and privacy["epsilon"] == pytest.approx(one_round)


def test_resume_continues_the_same_epsilon_and_adapter(dp_run: Path, tmp_path: Path) -> None:
    resumed = resume_after_round_1(dp_run, tmp_path / "copy")
    assert same_adapter(dp_run / "final", resumed / "final")
    a = json.loads((dp_run / "final" / "privacy.json").read_text())
    b = json.loads((resumed / "final" / "privacy.json").read_text())
    assert a == b


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("privacy.dp=true",), "privacy"),  # neither a noise multiplier nor a target
        (("privacy.dp=true", "privacy.target_epsilon=-1"), "privacy.target_epsilon"),
        (("privacy.dp=true", "privacy.noise_multiplier=1.0", "privacy.delta=2.0"), "privacy.delta"),
        (("privacy.dp=true", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0"), "privacy.clip_norm"),
        (("privacy.dp=true", "privacy.noise_multiplier=1.0", "fed.strategy='median'"), "fed.strategy"),
        (  # the clipped count's noise alone would spend more than the target allows
            (
                "privacy.dp=true",
                "privacy.target_epsilon=1.0",
                "privacy.adaptive_clipping=true",
                "privacy.clipped_count_stddev=0.1",
            ),
            "privacy.clipped_count_stddev",
        ),
        (
            ("privacy.dp=true", "privacy.noise_multiplier=0.3", "privacy.target_epsilon=0.01"),
            "privacy.target_epsilon",
        ),
        (
            ("privacy.dp=true", "privacy.noise_multiplier=1.0", "fed.outlier_norm_factor=3.0"),
            "fed.outlier_norm_factor",
        ),
    ],
)
def test_bad_privacy_settings_are_refused_before_a_run_directory(
    tmp_path: Path, overrides: tuple[str, ...], key: str
) -> None:
    with pytest.raises((FedtuneError, ValidationError), match=re.escape(key)):
        launch.run(load_config("configs/tiny.toml", [f"run.output_dir='{tmp_path}'", *overrides]))
    assert not any(tmp_path.iterdir())


def test_the_cli_exits_non_zero_on_a_bad_privacy_setting(tmp_path: Path, capsys) -> None:
    sets = [
        "--set",
        f"run.output_dir='{tmp_path}'",
        "--set",
        "privacy.dp=true",
        "--set",
        "fed.strategy='krum'",
    ]
    code, _, err = run_cli(
        capsys,
        "run",
        "--config",
        "configs/tiny.toml",
        "--no-progress",
        "--set",
        "privacy.noise_multiplier=1",
        *sets,
    )
    assert code != 0 and "fed.strategy" in err
    assert not any(tmp_path.iterdir())


# DP-SGD on clients in a run (each client's ε on every train line): tests/federated/test_wire_run.py
