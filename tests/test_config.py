from pathlib import Path

import pytest

from fedtune.config import Config, apply_overrides, config_from_run_config, load_config
from fedtune.errors import FedtuneError

CONFIGS = sorted(Path("configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    from fedtune.federated.strategies import check_strategy

    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert load_config(path, []).to_toml() == cfg.to_toml()
    check_strategy(cfg)  # the strategy exists and fits the LoRA ranks


def test_shipped_configs_exist() -> None:
    assert {"demo.toml", "tiny.toml"} <= {p.name for p in CONFIGS}


def test_overrides_are_parsed_as_toml_values() -> None:
    tree = apply_overrides(
        {},
        [
            "fed.rounds=5",
            "model.lora.target_modules=['q_proj']",
            "data.source=x.jsonl",
            "fed.evaluate_before=false",
        ],
    )
    assert tree == {
        "fed": {"rounds": 5, "evaluate_before": False},
        "model": {"lora": {"target_modules": ["q_proj"]}},
        "data": {"source": "x.jsonl"},
    }


def test_override_applies_over_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[fed]\nrounds = 2\n")
    assert load_config(path, ["fed.rounds=7"]).fed.rounds == 7


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.lora.r=0", "model.lora.r"),
        ("train.batch_size=-1", "train.batch_size"),
        ("data.max_source_length=0", "data.max_source_length"),
        ("partition.num_partitions=0", "partition.num_partitions"),
        ("fed.rounds=0", "fed.rounds"),
        ("fed.lr=1", "fed.lr"),  # unknown key
        ("model.rope_scaling.type='cubic'", "model.rope_scaling"),
    ],
)
def test_bad_values_name_their_key(override: str, key: str) -> None:
    with pytest.raises(FedtuneError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_override_names_the_override_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[fed]\nrounds = 2\n")

    with pytest.raises(
        FedtuneError, match=r"^--set fed\.rounds=0: fed\.rounds: Input should be greater than 0$"
    ):
        load_config(path, ["fed.rounds=0"])
    with pytest.raises(FedtuneError, match=r"^--set fed\.lr=1: fed\.lr: Extra inputs"):
        load_config(path, ["fed.lr=1"])


def test_bad_value_in_the_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[fed]\nrounds = 0\n")

    with pytest.raises(FedtuneError, match=rf"^{path}: fed\.rounds: Input should be greater than 0$"):
        load_config(path, ["train.lr=0.01"])


def test_each_error_names_its_own_origin(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nbatch_size = 0\n")

    with pytest.raises(FedtuneError) as caught:
        load_config(path, ["model.lora={r=0}", "model.lora.alpha=2"])

    assert str(caught.value).splitlines() == [
        "--set model.lora={r=0}: model.lora.r: Input should be greater than 0",  # the table set it
        f"{path}: train.batch_size: Input should be greater than 0",
    ]


def test_a_later_override_of_a_table_takes_the_blame() -> None:
    with pytest.raises(FedtuneError, match=r"^--set model\.lora=\{r=-1\}: model\.lora\.r:"):
        load_config(None, ["model.lora.r=0", "model.lora={r=-1}"])


def test_section_check_names_the_file_and_the_overrides_inside(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nmax_steps = 3\n")

    with pytest.raises(FedtuneError, match=rf"^{path} with --set train\.epochs=1: train: .*only one of"):
        load_config(path, ["train.epochs=1", "fed.rounds=2"])


def test_override_into_a_value_names_the_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[fed]\nrounds = 2\n")

    with pytest.raises(FedtuneError, match=r"^--set fed\.rounds\.x=1: 'fed\.rounds\.x': 'rounds' is a value"):
        load_config(path, ["fed.rounds.x=1"])


def test_steps_xor_epochs() -> None:
    with pytest.raises(FedtuneError, match=r"only one of train\.max_steps and train\.epochs"):
        load_config(None, ["train.epochs=1", "train.max_steps=3"])
    assert load_config(None, ["train.epochs=1"]).train.max_steps is None
    assert load_config(None, []).train.max_steps == 10


def test_bad_override_syntax() -> None:
    with pytest.raises(FedtuneError, match="KEY=VALUE"):
        load_config(None, ["fed.rounds"])


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[fed\nrounds = 2\n")
    with pytest.raises(FedtuneError, match=r"bad\.toml: invalid TOML"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_flower_run_config_is_file_plus_dotted_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("seed = 3\n[fed]\nrounds = 2\n")
    cfg = config_from_run_config(
        {"config-file": "c.toml", "fed.rounds": 4, "model.lora.r": 2}, app_dir=tmp_path
    )
    assert (cfg.seed, cfg.fed.rounds, cfg.model.lora.r) == (3, 4, 2)


def test_toml_round_trip() -> None:
    cfg = load_config(None, ["model.rope_scaling={type='linear', factor=2.0}"])
    assert load_config(None, []).model.rope_scaling is None
    import tomllib

    again = Config.model_validate(tomllib.loads(cfg.to_toml()))
    assert again == cfg


def test_extends_reads_the_base_first(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text("seed = 1\n[fed]\nrounds = 2\nstrategy = 'fedavg'\n")
    (tmp_path / "child.toml").write_text("extends = 'base.toml'\n[fed]\nrounds = 5\n")
    cfg = load_config(tmp_path / "child.toml")
    assert (cfg.seed, cfg.fed.rounds, cfg.fed.strategy) == (1, 5, "fedavg")
    assert load_config("configs/flexlora.toml").fed.stack_mode == "svd"
    assert load_config("configs/flexlora.toml").model.lora.ranks == "flora"  # two levels up


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("extends = 'b.toml'\n")
    (tmp_path / "b.toml").write_text("extends = 'a.toml'\n")
    with pytest.raises(FedtuneError, match="cycle"):
        load_config(tmp_path / "a.toml")
