"""TrainConfig: every option of ``goose train`` with its help, loaded from TOML, checked once."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "ConfigError", "DTYPES", "SCHEDULES", "RECOMPUTE", "FAMILIES", "RESUME_CHOICES",
           "OPTION_GROUPS", "load_toml", "merge", "problems", "validate", "is_family", "help_of"]

#: ``--dtype`` choices. float64 trains as the reference harness does; bf16 and fp16 keep fp32
#: master weights (fp16 also scales the loss).
DTYPES = ("float64", "float32", "bf16", "fp16")
SCHEDULES = ("gpipe", "1f1b")
RECOMPUTE = ("never", "except_last", "always")
#: Seeded tiny models by family name (goose_core.testing.TINY_MODELS); anything else is a folder.
FAMILIES = ("bloom", "gpt2", "llama")
RESUME_CHOICES = ("auto", "never")


class ConfigError(ValueError):
    """A bad option: the message names every bad value and the fix."""


def _opt(default: Any, help: str, group: str, *, metavar: str | None = None, choices: tuple[str, ...] = (),
         factory: Any = None) -> Any:
    meta = {"help": help, "group": group, "metavar": metavar, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """One training job. Field names are the TOML keys; ``--seq-len`` is ``seq_len``."""

    # model and data
    model: str = _opt("llama", "a local 🤗 model folder (config.json, weights), or a family name for a "
                      "seeded tiny model: " + ", ".join(FAMILIES), "model and data", metavar="DIR_OR_FAMILY")
    tokenizer: str = _opt("", "a local 🤗 tokenizer folder (default: the model folder's, else goose's "
                          "byte tokenizer)", "model and data", metavar="DIR")
    data: list[str] = _opt(None, "text files or folders of them: .txt (one document a file), .jsonl "
                           "(a 'text' field a line), .parquet (a 'text' column); default: the shipped corpus",
                           "model and data", metavar="PATH", factory=list)
    seq_len: int = _opt(64, "tokens per sequence: documents are packed into windows of this length",
                        "model and data")
    data_cache: str = _opt("", "folder for the tokenized text, so a restart skips tokenizing (default: "
                           "CHECKPOINT_DIR/tokens when there is a checkpoint folder)", "model and data", metavar="DIR")
    eval_fraction: float = _opt(0.05, "share of the packed windows held out for evaluation", "model and data")
    # layout
    tp: int = _opt(1, "tensor-parallel size (ranks that split every layer)", "layout")
    pp: int = _opt(1, "pipeline-parallel size (stages)", "layout")
    dp: int = _opt(0, "data-parallel size (0: the world size over tp x pp)", "layout")
    microbatches: int = _opt(1, "micro-batches per step (the pipeline's, or gradient accumulation at pp=1)",
                             "layout")
    schedule: str = _opt("gpipe", "pipeline schedule", "layout", choices=SCHEDULES)
    recompute: str = _opt("never", "recompute activations in the backward (pipeline stages)", "layout",
                          choices=RECOMPUTE)
    zero: bool = _opt(False, "shard the optimizer state over data-parallel ranks (ZeRO-1)", "layout")
    timeout: float = _opt(600.0, "seconds any collective may wait for a peer before the run stops "
                          "naming it (every process group's timeout)", "layout", metavar="SECONDS")
    nproc: int = _opt(0, "with no launcher, start this many local processes (torchrun --standalone)",
                      "layout", metavar="N")
    # optimization
    dtype: str = _opt("float32", "training precision", "optimization", choices=DTYPES)
    batch_size: int = _opt(8, "sequences per global step (over all data-parallel ranks)", "optimization")
    steps: int = _opt(100, "optimizer steps in the whole run", "optimization")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)", "optimization")
    min_lr: float = _opt(0.0, "learning rate the cosine decay ends at", "optimization")
    warmup: int = _opt(0, "steps of linear warmup before the cosine decay", "optimization")
    weight_decay: float = _opt(0.01, "AdamW weight decay", "optimization")
    clip: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping)", "optimization")
    seed: int = _opt(0, "seed of the tiny model's weights and the data order", "optimization")
    # checkpoints
    checkpoint_dir: str = _opt("", "folder for checkpoints, on a file system every rank sees (empty: none)",
                               "checkpoints", metavar="DIR")
    checkpoint_every: int = _opt(100, "save a checkpoint every this many steps (and at the end)", "checkpoints")
    keep: int = _opt(2, "checkpoints to keep (older ones are removed)", "checkpoints")
    resume: str = _opt("auto", "auto: from the latest complete checkpoint in --checkpoint-dir if any; "
                       "never: start afresh; or a checkpoint folder", "checkpoints", metavar="auto|never|PATH")
    export: str = _opt("", "at the end, write a 🤗 save_pretrained folder here (and the tokenizer)",
                       "checkpoints", metavar="DIR")
    # watching
    eval_every: int = _opt(0, "evaluate on the held-out windows every this many steps (0: at the end only)",
                           "watching")
    eval_batches: int = _opt(4, "global batches per evaluation", "watching")
    log_jsonl: str = _opt("", "append one JSON object per step (step, loss, lr, grad_norm, tokens, "
                          "tokens_per_s, ...) to this file", "watching", metavar="FILE")
    tensorboard: str = _opt("", "write TensorBoard event files to this folder", "watching", metavar="DIR")
    account: bool = _opt(False, "print each rank's bytes held, activation peak, FLOPs and bytes sent per "
                         "group for the second step (what goose plan predicts)", "watching")
    plot: str = _opt("", "draw the loss curve to this PNG at the end", "watching", metavar="FILE")
    progress: bool = _opt(True, "a progress bar on rank 0 (a plain line per step when not a terminal)",
                          "watching")
    verify: int = _opt(0, "before training, run this many steps of the same layout on a float64 copy of "
                       "the model beside one device and stop if they differ beyond PARALLEL", "watching",
                       metavar="K")


OPTION_GROUPS = ("model and data", "layout", "optimization", "checkpoints", "watching")


def help_of(name: str) -> str:
    """The help text of field ``name``."""
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


def is_family(model: str) -> bool:
    """Whether ``--model`` names a seeded tiny model rather than a folder."""
    return model in FAMILIES


def load_toml(path: str | Path) -> dict[str, Any]:
    """The options of a TOML file (``seq-len`` and ``seq_len`` both accepted), unknown keys refused.

    Raises:
        ConfigError: the file is missing, is not TOML, or has a key that is not an option.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file; give a TOML file of options")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("--config needs Python 3.11 (tomllib) or the tomli package on 3.10; "
                              "pip install tomli, or pass flags") from None
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {str(path)!r} is not valid TOML: {err}") from None
    known = {f.name for f in fields(TrainConfig)}
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {str(path)!r}: unknown option(s) {unknown}; `goose train --help` lists "
                          f"them (a TOML key is the flag without '--')")
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    # Relative paths in the file are relative to the file, as a person reading it expects.
    for key in ("model", "tokenizer", "data_cache", "checkpoint_dir", "export", "log_jsonl", "tensorboard", "plot",
                "resume"):
        value = values.get(key)
        if isinstance(value, str) and value and not (key == "model" and is_family(value)) \
                and not (key == "resume" and value in RESUME_CHOICES) and not Path(value).is_absolute():
            values[key] = str(path.parent / value)
    if "data" in values:
        values["data"] = [p if Path(p).is_absolute() else str(path.parent / p) for p in values["data"]]
    return values


def merge(*layers: dict[str, Any]) -> TrainConfig:
    """The defaults, overridden by each layer in turn (TOML, then flags: flags win).

    Raises:
        ConfigError: a value of the wrong type.
    """
    config = TrainConfig()
    types = {f.name: f for f in fields(TrainConfig)}
    for layer in layers:
        for key, value in layer.items():
            config = replace(config, **{key: _coerce(key, value, types[key])})
    return config


def _coerce(key: str, value: Any, spec: Any) -> Any:
    default = spec.default if spec.default is not MISSING else spec.default_factory()
    flag = "--" + key.replace("_", "-")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} = {value!r} must be true or false")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{flag} = {value!r} must be a list of paths")
        return list(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{flag} = {value!r} must be {type(default).__name__}, got {type(value).__name__}")
    return value


def problems(config: TrainConfig, world_size: int) -> list[str]:
    """Every bad value of ``config`` for a world of ``world_size`` ranks, each with its fix."""
    c, bad = config, []
    for name in ("tp", "pp", "microbatches", "batch_size", "steps", "seq_len", "checkpoint_every", "keep",
                 "eval_batches"):
        if getattr(c, name) < 1:
            bad.append(f"--{name.replace('_', '-')} {getattr(c, name)} must be >= 1")
    for name in ("dp", "warmup", "eval_every", "verify", "nproc"):
        if getattr(c, name) < 0:
            bad.append(f"--{name.replace('_', '-')} {getattr(c, name)} must be >= 0")
    for name in ("lr", "timeout"):
        if not (math.isfinite(getattr(c, name)) and getattr(c, name) > 0):
            bad.append(f"--{name.replace('_', '-')} {getattr(c, name)} must be a positive number")
    for name in ("min_lr", "weight_decay", "clip"):
        if not (math.isfinite(getattr(c, name)) and getattr(c, name) >= 0):
            bad.append(f"--{name.replace('_', '-')} {getattr(c, name)} must be a number >= 0")
    if c.min_lr > c.lr:
        bad.append(f"--min-lr {c.min_lr} is above --lr {c.lr}; the cosine decays from --lr down to --min-lr")
    if not 0 <= c.eval_fraction < 1:
        bad.append(f"--eval-fraction {c.eval_fraction} must lie in [0, 1)")
    if c.warmup >= c.steps >= 1:
        bad.append(f"--warmup {c.warmup} must be below --steps {c.steps}")
    for name, choices in (("dtype", DTYPES), ("schedule", SCHEDULES), ("recompute", RECOMPUTE)):
        if getattr(c, name) not in choices:
            bad.append(f"--{name} {getattr(c, name)!r} is not one of {list(choices)}")
    bad += _layout_problems(c, world_size)
    bad += _path_problems(c)
    return bad


def _layout_problems(c: TrainConfig, world_size: int) -> list[str]:
    if c.tp < 1 or c.pp < 1 or c.dp < 0 or c.microbatches < 1 or c.batch_size < 1:
        return []
    dp = c.dp or world_size // (c.tp * c.pp)
    if dp < 1 or c.tp * c.pp * dp != world_size:
        return [f"--tp {c.tp} x --pp {c.pp} x --dp {c.dp or dp} = {c.tp * c.pp * (c.dp or dp)} ranks, but "
                f"WORLD_SIZE is {world_size}; launch tp x pp x dp processes (torchrun --nproc-per-node, or "
                f"--nproc) or change the sizes"]
    if c.batch_size % (dp * c.microbatches):
        return [f"--batch-size {c.batch_size} does not divide into dp {dp} x --microbatches "
                f"{c.microbatches}; make it a multiple of {dp * c.microbatches}"]
    return []


def _path_problems(c: TrainConfig) -> list[str]:
    bad = []
    if not is_family(c.model) and not (Path(c.model) / "config.json").is_file():
        bad.append(f"--model {c.model!r} is neither a family ({', '.join(FAMILIES)}) nor a folder with a "
                   f"config.json; give one of those")
    if c.tokenizer and not Path(c.tokenizer).is_dir():
        bad.append(f"--tokenizer {c.tokenizer!r} is not a folder; give a local 🤗 tokenizer folder "
                   f"(tokenizer.json or tokenizer_config.json inside)")
    missing = [p for p in c.data if not Path(p).exists()]
    if missing:
        bad.append(f"--data: {missing} do not exist; give .txt, .jsonl or .parquet files or folders of them")
    if c.resume not in RESUME_CHOICES and not Path(c.resume).is_dir():
        bad.append(f"--resume {c.resume!r} is neither auto, never nor a checkpoint folder")
    return bad


def validate(config: TrainConfig, world_size: int) -> TrainConfig:
    """``config`` with ``dp`` resolved, or one :class:`ConfigError` listing every problem.

    Pure (no process group, no collective): every rank raises the same error before any of them
    joins one.
    """
    bad = problems(config, world_size)
    if bad:
        raise ConfigError("goose train: bad options:\n  " + "\n  ".join(bad))
    return replace(config, dp=config.dp or world_size // (config.tp * config.pp))
