"""The ``goose`` command: ``goose train`` (also ``python -m goose_core.train``), its flags built
from :class:`~goose_core.train.config.TrainConfig`, and ``--nproc`` starting local ranks."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import MISSING, fields
from typing import Any, Sequence

from goose_core.train.config import OPTION_GROUPS, ConfigError, TrainConfig, load_toml, merge, validate

__all__ = ["build_parser", "parse", "train_main", "main", "launch_local"]

DESCRIPTION = ("Train a 🤗 causal LM on your own text at any tp x pp x dp layout, from a TOML file and/or "
               "flags (flags win). Runs under torchrun (also across nodes), or starts --nproc local ranks.")
EPILOG = ("Every option is also a TOML key (--seq-len is seq_len or seq-len). A run with --checkpoint-dir "
          "resumes from its latest complete checkpoint when started again (--resume auto).")


def build_parser(prog: str = "goose train") -> argparse.ArgumentParser:
    """The parser: one flag per :class:`TrainConfig` field, in its group, with its help.

    Defaults are suppressed, so :func:`parse` sees only the flags given (they then win over the
    TOML file); the help shows each default.
    """
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.toml", help="a TOML file of options (flags override it)")
    groups = {name: parser.add_argument_group(name) for name in OPTION_GROUPS}
    for f in fields(TrainConfig):
        groups[f.metadata["group"]].add_argument(*_flag(f), **_kwargs(f))
    return parser


def _flag(f: Any) -> list[str]:
    return ["--" + f.name.replace("_", "-")]


def _kwargs(f: Any) -> dict[str, Any]:
    default = f.default if f.default is not MISSING else f.default_factory()
    meta = f.metadata
    shown = "" if default in ("", []) else f" (default: {default})"
    kwargs: dict[str, Any] = {"help": meta["help"] + shown, "dest": f.name}
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
        return kwargs
    if isinstance(default, list):
        kwargs["nargs"] = "+"
        kwargs["type"] = str
    else:
        kwargs["type"] = type(default)
    if meta["choices"]:
        kwargs["choices"] = list(meta["choices"])
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    return kwargs


def parse(argv: Sequence[str] | None = None) -> TrainConfig:
    """The configuration of ``argv``: defaults, then ``--config``'s TOML, then the flags.

    Raises:
        ConfigError: a bad TOML file (missing, invalid, an unknown key or a wrong type).
        SystemExit: an unknown flag or a value argparse cannot convert (argparse's message).
    """
    given = vars(build_parser().parse_args(argv))
    toml = load_toml(given.pop("config")) if "config" in given else {}
    return merge(toml, given)


def launch_local(argv: Sequence[str], nproc: int) -> int:
    """Run this job on ``nproc`` local ranks, as ``torchrun --standalone`` would, and return its
    exit status (1 when a rank failed; torch's report names it).

    torch's launcher API takes the command as given: no second parse of our flags by torchrun's
    own (whose prefix matching would take ``--nproc`` for ``--nproc-per-node``).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default: one thread a rank
    try:
        elastic_launch(config, sys.executable)("-m", "goose_core.train", *argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = failure.signal_name() if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"goose train: rank {rank} failed first ({how}); the other ranks were stopped. Its error is "
              f"above; with --checkpoint-dir, the same command resumes from the latest complete checkpoint.",
              file=sys.stderr)
        return 1
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """``goose train``: parse, validate (every rank, before any process group), then train.

    Returns the exit status (2 for a bad option).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    launched = "LOCAL_RANK" in os.environ
    try:
        config = parse(argv)
        world = int(os.environ.get("WORLD_SIZE", "1")) if launched or not config.nproc else config.nproc
        config = validate(config, world)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if config.nproc and not launched:
        return launch_local(argv, config.nproc)
    from goose_core.train.build import prepare  # torch and transformers load only for a valid job
    from goose_core.train.job import run

    try:
        inputs = prepare(config)  # the tokenizer and the files: still before any process group
    except ValueError as err:  # ConfigError, and the data layer's errors naming a file or folder
        print(f"goose train: {err}", file=sys.stderr)
        return 2
    run(config, inputs=inputs)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``goose`` console script: ``goose train ...`` (more subcommands may follow)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from goose_core.plan.cli import plan_main

    commands = {"train": train_main, "plan": plan_main}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        wrong = f"goose: unknown command {argv[0]!r}\n" if argv and argv[0] not in ("-h", "--help") else ""
        sys.stderr.write(f"{wrong}usage: goose {{{','.join(commands)}}} ...\n"
                         f"  train   train a causal LM at any tp x pp x dp layout (goose train --help)\n"
                         f"  plan    predict each rank's memory, FLOPs and traffic (goose plan --help)\n")
        return 0 if not wrong and argv else 2
    return commands[argv[0]](argv[1:])
