"""The family sweep's record: JSON for machines, a Markdown compatibility table for the docs site."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

from sweep.families import SweepFamily

__all__ = ["BUILD", "STATUSES", "Outcome", "write_json", "write_markdown", "markdown", "merge"]

STATUSES = ("equal", "refused", "wrong", "crash")
BUILD = "build"  # the pseudo-mode of a family's reference run ("not buildable" when it fails)
_NOT_BUILDABLE = "not buildable"


@dataclass
class Outcome:
    """One (family, mode): its status, the reason or the numbers, and how long it took."""

    family: str
    mode: str
    status: str  # one of STATUSES, or "ok" / "not buildable" for mode BUILD
    detail: str = ""
    error: float | None = None  # worst |got - want| as a multiple of PARALLEL's allowance
    seconds: float = 0.0


def _title(layout: dict[str, int]) -> str:
    """ "tp=2", "pp=2", "tp=2 × pp=2" from {"tp": 2, "pp": 1}."""
    return " × ".join(f"{axis}={n}" for axis, n in layout.items() if n > 1)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: Path | None, chosen: list[SweepFamily], modes: list[str],
               outcomes: dict[tuple[str, str], Outcome], settings: dict[str, Any]) -> dict[str, Any]:
    """Write (unless ``path`` is None) and return the record: versions, ``settings`` (how the sweep ran: ``modes`` maps
    each mode to its layout), counts per mode, every family's outcomes."""
    rows = {}
    for family in chosen:
        build = outcomes.get((family.model_type, BUILD))
        built = build is not None and build.status == "ok"
        row: dict[str, Any] = {"class": family.model_class, "declares": family.declares,
                               "build": None if built else (build.detail if build else "not run"),
                               "float32_modules": build.detail.split(", ") if built and build.detail else []}
        for mode in modes:
            if (o := outcomes.get((family.model_type, mode))) is not None:
                row[mode] = {k: v for k, v in asdict(o).items() if k not in ("family", "mode")}
        rows[family.model_type] = row
    counts = {mode: {s: sum(1 for r in rows.values() if r.get(mode, {}).get("status") == s) for s in STATUSES}
              for mode in modes}
    for mode in modes:
        counts[mode][_NOT_BUILDABLE] = sum(1 for r in rows.values() if r["build"] is not None)
    record = {
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "goose_commit": _commit(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": settings,
        "seconds": round(sum(o.seconds for o in outcomes.values()), 1),
        "counts": counts,
        "families": rows,
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return record


def merge(record: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``extra``'s modes added (a subset sweep of other modes, e.g. ep2 over the MoE
    families), each family's result beside its others; the record of when and where each added
    mode was measured goes under ``"merged"``, the page prints it. Modes ``record`` has already are
    replaced.

    Raises:
        ValueError: the two were measured with other versions of 🤗 transformers or torch, or
            ``extra`` names a family ``record`` does not list.
    """
    for key in ("transformers", "torch"):
        if record[key] != extra[key]:
            raise ValueError(f"cannot merge a sweep of {key} {extra[key]} into one of {record[key]}: "
                             f"run every mode with the same versions")
    if unknown := sorted(set(extra["families"]) - set(record["families"])):
        raise ValueError(f"families {unknown} are not in the record merged into: run the full sweep")
    out = json.loads(json.dumps(record))  # a deep copy
    for mode in extra["counts"]:
        out["settings"]["modes"][mode] = extra["settings"]["modes"][mode]
        out["counts"][mode] = extra["counts"][mode]
        out.setdefault("merged", {})[mode] = {k: extra[k] for k in ("measured", "goose_commit", "seconds")}
        for name, row in extra["families"].items():
            if mode in row:
                out["families"][name][mode] = row[mode]
    return out


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "–"
    status = result["status"]
    if status == "equal":
        return "equal"
    if status == "wrong":
        return f"**wrong** ({result['error']:.0e}×)"
    return "refused" if status == "refused" else "**crash**"


def _title_of_expert(layout: dict[str, int]) -> str:
    """What an expert-parallel mode runs: the families with experts, at dp = ep."""
    ep = layout.get("ep", 1)
    return f"every family with experts, dp = ep = {ep}, each rank 1/{ep} of the batch" if ep > 1 else "a subset"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def markdown(record: dict[str, Any]) -> str:
    """The docs page of ``record``."""
    modes = list(record["counts"])
    rows = record["families"]
    s = record["settings"]
    titles = {m: _title(s["modes"][m]) for m in modes}
    out = [
        "# Family coverage",
        "",
        "Every causal-LM family of the installed 🤗 transformers that declares its plans "
        "(`base_model_tp_plan` and/or `base_model_pp_plan`), plus a few that declare none, built tiny "
        "(hidden 64, 4 heads, 2 kv-heads, 4 layers, vocab 256; MoE: 4 experts, top-2, router loss on; "
        "sliding windows of 8 tokens), seeded, and trained "
        f"{s['steps']} SGD steps in {s['dtype']} on one fixed batch (the last step right-padded with an "
        "`attention_mask`) under goose's tensor and pipeline parallelism, against the single-device run "
        f"at the `{s['tolerance']}` tolerance. The pipeline runs {s['num_microbatches']} micro-batches and "
        "is equal when it matches either single-device run: on the whole batch, or accumulating the same "
        "micro-batches (🤗's gradient accumulation with `num_items_in_batch`; the two differ where a family "
        "sums in float32 or adds a per-batch auxiliary loss, and the reason says which one matched).",
        "",
        f"Measured {record['measured']} with **transformers {record['transformers']}**, **torch "
        f"{record['torch']}**, Python {record['python']}, goose commit `{record['goose_commit']}` "
        f"(its runs took {record['seconds']:.0f} s). Regenerate with `make coverage` (`PYTHONPATH=tools "
        "python -m sweep --help` for a subset); the raw record is "
        "[coverage.json](coverage.json).",
        "",
        *[f"The {titles[m]} column ({_title_of_expert(s['modes'][m])}) was measured {when['measured']} at goose "
          f"commit `{when['goose_commit']}` ({when['seconds']:.0f} s) and merged in (`--merge`); a family "
          f"without experts shows –." for m, when in record.get("merged", {}).items()],
        *([""] if record.get("merged") else []),
        "- **equal**: every rank's losses and gathered parameters match the single-device run.",
        "- **refused**: goose raised a clear error before the first step (its message is below).",
        "- **wrong**: the numbers differ; the worst error as a multiple of the tolerance's allowance.",
        "- **crash**: any other exception, a hang, or ranks that disagree: a bug.",
        "",
        "## Counts",
        "",
        "| mode | " + " | ".join(list(STATUSES) + [_NOT_BUILDABLE]) + " | equal of those built |",
        "|---|" + "---:|" * (len(STATUSES) + 2),
    ]
    for mode in modes:
        c = record["counts"][mode]
        built = sum(c[k] for k in STATUSES)
        share = f"{100 * c['equal'] / built:.0f} %" if built else "–"
        out.append(f"| {titles[mode]} | " + " | ".join(str(c[k]) for k in list(STATUSES) + [_NOT_BUILDABLE])
                   + f" | {share} |")
    out += ["", "## Families", "",
            "| family | declares | " + " | ".join(titles[m] for m in modes) + " |",
            "|---|---|" + "---|" * len(modes)]
    for name, row in rows.items():
        if row["build"] is None:
            mark = " †" if row["float32_modules"] else ""
            out.append(f"| `{name}`{mark} | {row['declares']} | " + " | ".join(_cell(row.get(m)) for m in modes) + " |")
    narrow = {name: row["float32_modules"] for name, row in rows.items() if row.get("float32_modules")}
    if narrow:
        out += ["", "† Modules whose output is float32 inside the float64 model (🤗's code casts; a cast "
                "that returns float64 again is not seen). Where such a module sums over tokens (a router's "
                "or a norm's weight gradient), splitting the batch into micro-batches changes the float32 "
                "rounding: the pipeline is then compared with the single-device run that accumulates the "
                "same micro-batches as well.", ""]
        out += [f"- `{name}`: " + ", ".join(f"`{m}`" for m in mods) for name, mods in narrow.items()]
    out += ["", "## Reasons", "",
            "What goose said for every refusal, and what went wrong for every crash and wrong result.", ""]
    for name, row in rows.items():
        for mode in modes:
            r = row.get(mode)
            if r is not None and r["status"] != "equal":
                out.append(f"- `{name}` {titles[mode]}, {r['status']}: {_one_line(r['detail'])}")
    out += ["", "## Not buildable", "",
            "Families the sweep could not build or train on one device at the tiny size in float64 (not "
            "goose's verdict on them: the reason says what failed).", ""]
    out += [f"- `{name}` ({row['declares']}): {_one_line(row['build'])}" for name, row in rows.items()
            if row["build"] is not None]
    return "\n".join(out) + "\n"


def write_markdown(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(record))
