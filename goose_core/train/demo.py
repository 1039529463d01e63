"""``make demo``: goose train at tp2 x pp2 x dp2 + ZeRO-1, killed with SIGKILL mid-run and started
again with the same command, which resumes from the latest complete checkpoint.

Run it: ``python -m goose_core.train.demo [--out demo-out]`` (8 local processes). It trains a
BPE tokenizer from the shipped corpus into ``OUT/tokenizer``, then runs :data:`DEMO_CONFIG`, and
leaves ``OUT/checkpoints``, ``OUT/export`` (a 🤗 folder with the tokenizer), ``OUT/log.jsonl``,
``OUT/tensorboard`` (if tensorboard is installed) and ``OUT/loss.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from goose_core.data import CORPUS_PATH, train_bpe_tokenizer
from goose_core.train.loop import KILL_ENV

__all__ = ["DEMO_CONFIG", "KILL", "main"]

DEMO_CONFIG = Path(__file__).with_name("demo.toml")
#: Which rank dies, and after which step: step 20's checkpoint is the latest, so the rerun
#: repeats steps 21-25 and goes on.
KILL = (5, 25)


def _say(text: str) -> None:
    print(f"\n[demo] {text}", flush=True)


def _sample(export: Path) -> str:
    """A few greedy tokens from the exported folder on one device, as any 🤗 user would load it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(export, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
    ids = torch.tensor([tokenizer.encode("The ", add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    parser.add_argument("--nproc", type=int, default=8, help="local ranks (tp x pp x dp of the config)")
    args = parser.parse_args(argv)
    out, nproc = Path(args.out), args.nproc
    started = time.perf_counter()
    for old in ("checkpoints", "export", "tensorboard", "log.jsonl", "loss.png"):
        shutil.rmtree(out / old, ignore_errors=True) if (out / old).is_dir() else (out / old).unlink(missing_ok=True)
    _say(f"a BPE tokenizer from the shipped corpus ({CORPUS_PATH.name}) with 🤗 tokenizers -> {out / 'tokenizer'}")
    train_bpe_tokenizer([CORPUS_PATH], out / "tokenizer", vocab_size=512)
    command = ["goose", "train", "--config", str(DEMO_CONFIG), "--tokenizer", str(out / "tokenizer"),
               "--checkpoint-dir", str(out / "checkpoints"), "--log-jsonl", str(out / "log.jsonl"),
               "--export", str(out / "export"), "--plot", str(out / "loss.png"), "--nproc", str(nproc)]
    if importlib.util.find_spec("tensorboard") is not None:
        command += ["--tensorboard", str(out / "tensorboard")]
    run = [sys.executable, "-m", "goose_core.train", *command[2:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rank, step = KILL
    _say(f"{shlex.join(command)}\n[demo] (rank {rank} will kill -9 itself after step {step}: {KILL_ENV}={rank}:{step})")
    killed = subprocess.run(run, env={**env, KILL_ENV: f"{rank}:{step}"})
    if killed.returncode == 0:
        raise SystemExit("[demo] the run was meant to be killed, and finished instead")
    _say(f"rank {rank} is gone (exit status {killed.returncode}). The same command again:\n"
         f"[demo] {shlex.join(command)}")
    if subprocess.run(run, env=env).returncode != 0:
        raise SystemExit("[demo] the resumed run failed")
    _say(f"the export, loaded on one device with AutoModelForCausalLM.from_pretrained, continues 'The ': "
         f"{_sample(out / 'export')!r}")
    _say(f"done in {time.perf_counter() - started:.0f}s: {out / 'loss.png'}, {out / 'log.jsonl'}, "
         f"{out / 'export'}, {out / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
