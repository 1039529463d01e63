"""The configuration reference page, written from :class:`~goose_core.train.config.TrainConfig`
(the docs build publishes it; ``--help`` reads the same fields)."""

from __future__ import annotations

from dataclasses import MISSING, fields

from goose_core.train.config import OPTION_GROUPS, TrainConfig

__all__ = ["config_reference"]

INTRO = """# goose train: configuration reference

Every option of `goose train` (also `python -m goose_core.train`), generated from
`goose_core/train/config.py`, the source `goose train --help` is built from. Each is a flag and a
key of the `--config` TOML file (`--seq-len 64` on the command line is `seq-len = 64` or
`seq_len = 64` in the file); flags override the file, the file overrides the defaults. Relative
paths in a TOML file are taken relative to the file. A bad value stops the run on every rank with
one message naming each problem and its fix, before any process group is created.

```toml
# job.toml: goose train --config job.toml --steps 2000
model = "llama"
tokenizer = "my-tokenizer"
data = ["corpus/", "extra.jsonl"]
seq-len = 1024
tp = 2
pp = 2
zero = true
dtype = "bf16"
checkpoint-dir = "/shared/ckpt"
```
"""


def _default(f: object) -> str:
    value = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[attr-defined]
    if value in ("", []):
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def config_reference() -> str:
    """The Markdown page: one table per option group, every field with its flag, default and help."""
    parts = [INTRO]
    for group in OPTION_GROUPS:
        parts.append(f"\n## {group.capitalize()}\n\n| flag | TOML key | default | what it does |\n|---|---|---|---|")
        for f in fields(TrainConfig):
            if f.metadata["group"] != group:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(f.default, bool):
                flag += "` / `--no-" + f.name.replace("_", "-")
            choices = f" One of: {', '.join(f.metadata['choices'])}." if f.metadata["choices"] else ""
            text = f.metadata["help"].replace("|", "\\|")
            parts.append(f"| `{flag}` | `{f.name}` | `{_default(f)}` | {text}.{choices} |")
    parts.append("\n`--config FILE.toml` reads a file of these keys; `goose train --help` prints this list.\n")
    return "\n".join(parts)
