"""Experiment pairs without DVC, Prefect or MLflow, several at once: for a machine that has torch, transformers and
peft but not the project's orchestration (a lent GPU machine), or for a pilot at settings other than the committed
ones. Each pair is iga.experiment.pair.run_pair, the computation of its DVC stage, in a process of its own.

    python tools/run_pairs.py OUT.jsonl --runs oracle erm iga --seeds 0 1 2 --device cuda \\
        --set experiment.steps=192 --set experiment.eval_groups=33 [--jobs 1] [--deadline-s 420]
    python tools/run_pairs.py OUT.jsonl --unpack DIR   # DIR/<run>/draw<d>/seed<s>/ as the pair stages write them

Pairs start seed by seed (every run of the first seed, then the next), as many at once as --jobs; none starts after
--deadline-s. Each finished pair is appended to OUT.jsonl as one line ({stage, metrics, scores, lcs}) the moment it
finishes, so a killed sweep keeps what it finished and a rerun skips it. Reads data/ (the split, the gate's accepted
rows, the seeds, the runs' training data: `dvc repro selected` makes it) and models/base, which it writes first
from the embedded GGUF when it is missing.

--jobs > 1 is for CPU cores, not for one GPU: 8 pairs at once on one H200 (16 cores, 2 threads each) finished none
in 7 min, the GPU 7 % busy, where one step alone takes 0.15-0.40 s (docs/measured.md, "On a GPU").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iga.errors import ConfigError  # noqa: E402
from iga.experiment.sweep import Pair  # noqa: E402
from iga.io import read_jsonl, write_json, write_jsonl  # noqa: E402
from iga.params import PARAMS_FILE, Params, load_params  # noqa: E402
from tasks.paths import BASE_MODEL, RUNS, SEEDS, pair_inputs, pair_outputs  # noqa: E402 (no Prefect)


def overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs, each value read as YAML (192 -> int, cuda -> str, [a, b] -> list)."""
    import yaml

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def one(params_path: str, sets: dict[str, Any], pair: Pair, device: str, threads: int, deadline: float
        ) -> dict[str, Any] | None:
    """A pair in this worker process; None when it would start after the deadline."""
    if time.time() > deadline:
        return None
    import torch

    from iga.data.teacher import make_teacher
    from iga.data.verify import make_verifier
    from iga.experiment.pair import PairData, run_pair
    from iga.hardware import resolve_device

    torch.set_num_threads(threads)
    params = load_params(params_path, sets)
    run = params.experiment.runs[pair.run]
    data = PairData.read(pair_inputs(run.select))
    method = params.methods[run.method]
    verifier = make_verifier(params, read_jsonl(SEEDS), make_teacher(params)) if method.kind == "vcd" else None
    with tempfile.TemporaryDirectory(prefix="iga-pair-") as checkpoints:
        result = run_pair(params, pair, data, BASE_MODEL, resolve_device(device), checkpoints=Path(checkpoints),
                          key=pair.key, verifier=verifier)
    return {"stage": pair.stage, **result}


def sweep(args: argparse.Namespace) -> None:
    sets = overrides(args.set)
    params: Params = load_params(args.params, sets)
    unknown = [r for r in args.runs if r not in params.experiment.runs]
    if unknown:
        raise ConfigError(f"{args.params}: no run {', '.join(map(repr, unknown))} under experiment.runs")
    if not (BASE_MODEL / "config.json").is_file():
        from iga.train.student import prepare_base

        print(f"writing {BASE_MODEL} from student.base {params.student.base}: "
              f"{prepare_base(params.student.base, BASE_MODEL)}", flush=True)
    done = {json.loads(line)["stage"] for line in args.out.read_text().splitlines()} if args.out.is_file() else set()
    pairs = [Pair(run, args.draw, seed) for seed in args.seeds for run in args.runs]
    todo = [p for p in pairs if p.stage not in done]
    print(f"{len(pairs)} pairs, {len(pairs) - len(todo)} already in {args.out}; {args.jobs} at a time on {args.device}, "
          f"{args.threads} threads each", flush=True)
    deadline = time.time() + args.deadline_s if args.deadline_s else float("inf")
    start = time.time()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        running = {pool.submit(one, args.params, sets, p, args.device, args.threads, deadline): p for p in todo}
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                pair = running.pop(future)
                result = future.result()
                if result is None:
                    print(f"{pair.stage}: not started (deadline)", flush=True)
                    continue
                with args.out.open("a") as f:  # one line per pair, flushed as it finishes
                    f.write(json.dumps(result) + "\n")
                m, t = result["metrics"]["eval"], result["metrics"]["train"]
                print(f"{time.time() - start:6.0f} s  {pair.stage}: ID {m['id_accuracy']:.3f} OOD {m['ood_accuracy']:.3f} "
                      f"NLL OOD {m['nll_ood']:.3f}; train {t['train_s']:.0f} s, eval {t['eval_s']:.0f} s", flush=True)


def unpack(out: Path, folder: Path) -> None:
    """Each pair's files under `folder` as the pair stages lay them out under experiments/runs/, metrics last."""
    for line in out.read_text().splitlines():
        result = json.loads(line)
        m = result["metrics"]
        paths = {k: folder / p.relative_to(RUNS) for k, p in pair_outputs(m["run"], m["draw"], m["seed"]).items()}
        write_jsonl(paths["scores"], result["scores"])
        write_jsonl(paths["lcs"], result["lcs"])
        write_json(paths["metrics"], m)
        print(paths["metrics"].parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--unpack", type=Path, metavar="DIR")
    ap.add_argument("--params", default=str(PARAMS_FILE))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml key, overridden")
    ap.add_argument("--runs", nargs="+", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--draw", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--deadline-s", type=float, default=0, help="start no pair after this many seconds (0: none)")
    args = ap.parse_args()
    if args.unpack:
        unpack(args.out, args.unpack)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
