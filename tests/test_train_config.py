"""goose train's options: TOML and flags (flags win), every bad value refused in one message
before any process group, --help documenting every option, the goose command."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from goose_core.train import cli
from goose_core.train.config import ConfigError, TrainConfig, help_of, load_toml, merge, validate
from goose_core.train.schedule import lr_at


def test_toml_then_flags_flags_win(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello", encoding="utf-8")
    toml = tmp_path / "job.toml"
    toml.write_text('model = "gpt2"\nseq-len = 48\ntp = 2\nlr = 1\ndata = "data.txt"\nzero = true\n'
                    'checkpoint_dir = "ck"\n', encoding="utf-8")
    config = cli.parse(["--config", str(toml), "--tp", "4", "--no-zero", "--steps", "7"])
    assert (config.model, config.seq_len, config.tp, config.zero, config.steps) == ("gpt2", 48, 4, False, 7)
    assert config.lr == 1.0 and isinstance(config.lr, float), "a TOML integer for a float option is a float"
    assert config.data == [str(tmp_path / "data.txt")], "paths in the file are relative to the file"
    assert config.checkpoint_dir == str(tmp_path / "ck")
    assert cli.parse([]) == TrainConfig(), "no file and no flags: the defaults"


@pytest.mark.parametrize("text, message", [
    ("tpp = 2\n", r"unknown option\(s\) \['tpp'\]"),
    ("tp = 'two'\n", r"--tp = 'two' must be int"),
    ("zero = 1\n", r"--zero = 1 must be true or false"),
    ("tp = \n", r"is not valid TOML"),
])
def test_a_bad_toml_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        cli.parse(["--config", str(toml)])
    with pytest.raises(ConfigError, match="no such file"):
        load_toml(tmp_path / "missing.toml")


BAD = [  # (options, world size, what the message must say)
    ({"tp": 0}, 1, r"--tp 0 must be >= 1"),
    ({"steps": 0}, 1, r"--steps 0 must be >= 1"),
    ({"seq_len": 0}, 1, r"--seq-len 0 must be >= 1"),
    ({"lr": -1.0}, 1, r"--lr -1.0 must be a positive number"),
    ({"lr": float("nan")}, 1, r"--lr nan must be a positive number"),
    ({"clip": -1.0}, 1, r"--clip -1.0 must be a number >= 0"),
    ({"min_lr": 0.1, "lr": 0.01}, 1, r"--min-lr 0.1 is above --lr 0.01"),
    ({"warmup": 10, "steps": 10}, 1, r"--warmup 10 must be below --steps 10"),
    ({"eval_fraction": 1.0}, 1, r"--eval-fraction 1.0 must lie in \[0, 1\)"),
    ({"dtype": "half"}, 1, r"--dtype 'half' is not one of"),
    ({"schedule": "zb"}, 1, r"--schedule 'zb' is not one of"),
    ({"tp": 2, "pp": 2, "dp": 1}, 8, r"= 4 ranks, but WORLD_SIZE is 8"),
    ({"tp": 3}, 8, r"--tp 3 x --pp 1 x --dp 2 = 6 ranks, but WORLD_SIZE is 8"),
    ({"batch_size": 6, "microbatches": 2}, 2, r"--batch-size 6 does not divide into dp 2 x --microbatches 2; "
                                              r"make it a multiple of 4"),
    ({"model": "/nowhere"}, 1, r"--model '/nowhere' is neither a family .* nor a folder with a config.json"),
    ({"tokenizer": "/nowhere"}, 1, r"--tokenizer '/nowhere' is not a folder"),
    ({"data": ["/nowhere.txt"]}, 1, r"--data: \['/nowhere.txt'\] do not exist"),
    ({"resume": "/nowhere"}, 1, r"--resume '/nowhere' is neither auto, never nor a checkpoint folder"),
    ({"keep": 0}, 1, r"--keep 0 must be >= 1"),
    ({"verify": -1}, 1, r"--verify -1 must be >= 0"),
    ({"timeout": 0.0}, 1, r"--timeout 0.0 must be a positive number"),
]


@pytest.mark.parametrize("options, world, message", BAD, ids=[m[:24] for _, _, m in BAD])
def test_every_bad_value_is_named_with_its_fix(options: dict, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(merge(options), world)


def test_all_problems_in_one_error_and_dp_resolved() -> None:
    with pytest.raises(ConfigError) as err:
        validate(merge({"tp": 0, "lr": 0.0, "dtype": "x"}), 1)
    assert len(str(err.value).splitlines()) == 4, "one error listing the three problems"
    assert validate(merge({"tp": 2, "pp": 2}), 8).dp == 2, "dp 0 means the world over tp x pp"


def test_bad_options_exit_2_before_any_process_group(capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed as dist

    assert cli.train_main(["--tp", "2", "--nproc", "3"]) == 2
    assert "--tp 2 x --pp 1 x --dp 1 = 2 ranks, but WORLD_SIZE is 3" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_help_lists_every_option_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert re.sub(r"\s+", " ", help_of(f.name))[:30] in text, flag
    for flag in ("--model", "--tokenizer", "--data", "--seq-len", "--batch-size", "--tp", "--pp", "--dp",
                 "--microbatches", "--schedule", "--recompute", "--zero", "--dtype", "--lr", "--warmup", "--steps",
                 "--seed", "--clip", "--checkpoint-dir", "--checkpoint-every", "--keep", "--resume", "--eval-every",
                 "--export", "--log-jsonl", "--verify", "--config", "--nproc"):
        assert flag + " " in text, f"the issue names {flag}"


def test_the_goose_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "plan" in capsys.readouterr().err  # goose plan is a subcommand beside train
    assert cli.main(["deploy"]) == 2
    assert "unknown command 'deploy'" in capsys.readouterr().err


def test_the_learning_rate_schedule() -> None:
    lrs = [lr_at(s, 1.0, 10, warmup=2, min_lr=0.1) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0], "linear warmup, then the cosine from the peak"
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.1
    assert lr_at(10, 1.0, 10, 2, 0.1) == pytest.approx(0.1)


def test_bad_data_is_one_message_before_any_process_group(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed as dist

    (tmp_path / "tiny.txt").write_text("too short", encoding="utf-8")
    assert cli.train_main(["--data", str(tmp_path / "tiny.txt"), "--seq-len", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("goose train: ") and "tiny.txt" in err and "Traceback" not in err
    assert not dist.is_initialized()


def test_the_demo_config_is_valid_at_8_ranks() -> None:
    from goose_core.train.demo import DEMO_CONFIG

    config = validate(merge(load_toml(DEMO_CONFIG)), 8)
    assert (config.tp, config.pp, config.dp, config.zero, config.model) == (2, 2, 2, True, "llama")


def test_the_config_reference_names_every_option() -> None:
    from goose_core.train.reference import config_reference

    page = config_reference()
    for f in fields(TrainConfig):
        assert f"| `--{f.name.replace('_', '-')}" in page and f"`{f.name}`" in page, f.name
