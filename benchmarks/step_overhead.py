"""IGA's cost over ERM per training step, measured side by side on the same isomer batch and model.

Three steps, alternating, `--reps` rounds of timed steps and of memory steps; medians of the
per-round ratios: ERM (plain mean loss), IGA with its per-domain
gradients from one forward+backward, and IGA with N separate forward+backward passes (the paper's
way, which pays 2.0–2.2× time and +18 % memory). Memory is the process's peak resident set during
the step (iga/experiment/cost.py, the meter of Table 3 too).

    python benchmarks/step_overhead.py                  # tiny and SmolLM2 (needs models/base: flows.student)
    python benchmarks/step_overhead.py --models tiny
    python benchmarks/step_overhead.py --device cuda --groups 8   # on a GPU (bf16 autocast: --precision auto)

The last line is the IGA/ERM ratio of the last model: `iga/erm time ratio: X.XX, memory ratio: Y.YY`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iga.experiment.cost import step_memory, step_time  # noqa: E402
from iga.hardware import describe, resolve_device, resolve_precision  # noqa: E402
from iga.io import read_jsonl  # noqa: E402
from iga.params import load_params  # noqa: E402
from iga.train.methods import build_method  # noqa: E402
from iga.train.sft import collate, encode_groups, isomer_groups  # noqa: E402
from iga.train.student import build_tiny, load_student  # noqa: E402

STEPS = ("erm", "iga", "iga_n_passes")


def load(model_name: str, params):
    if model_name == "tiny":
        model, tokenizer = build_tiny()
        base = Path(tempfile.mkdtemp(prefix="iga-bench-tiny-"))
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    else:
        base = Path(model_name)
    return load_student(base, params.lora, seed=0)


def measure(model_name: str, groups_per_batch: int, reps: int, params, rows, device: torch.device,
            precision: str) -> dict[str, dict[str, float]]:
    model, tokenizer = load(model_name, params)
    model.to(device)
    with torch.no_grad():  # nonzero B, as after a few steps: the factor gradient of A is then nonzero too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    groups, _ = encode_groups(tokenizer, isomer_groups(rows, params.domains.train, "train"), params.train.max_length)
    batch = collate(groups[:groups_per_batch], tokenizer.pad_token_id, seed=0).to(device)
    iga = params.methods["iga"]
    methods = {"erm": build_method(params.methods["erm"], model, params.domains.train),
               "iga": build_method(iga, model, params.domains.train),
               "iga_n_passes": build_method(replace(iga, passes="per_domain"), model, params.domains.train)}
    results: dict[str, dict[str, list[float]]] = {k: {"time": [], "peak": [], "extra": []} for k in STEPS}
    # Time rounds first, then memory rounds: a memory probe hands the freed heap back to the OS,
    # and the next step would pay page faults that a training loop never pays. Within a round each
    # method takes an untimed step before its timed one, so that, as in training, the timed step
    # follows a step of the same method (the allocator's state depends on what ran before).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bfloat16" else nullcontext()
    for rep in range(reps + 1):  # the first round warms up kernels and is not counted
        for name in STEPS:
            with autocast:
                step_time(methods[name], batch, device)  # untimed
                seconds = step_time(methods[name], batch, device)
            if rep:
                results[name]["time"].append(seconds)
    for rep in range(reps + 1):
        for name in STEPS:
            with autocast:
                peak, extra = step_memory(methods[name], batch, device)
            if rep:
                results[name]["peak"].append(peak)
                results[name]["extra"].append(extra)
    # Ratios are taken per round, between steps run back to back, then the median: this VM's speed
    # drifts by ±20 % over a minute, which a ratio of separate medians would pick up.
    stats = {k: {m: statistics.median(v) for m, v in results[k].items()} for k in STEPS}
    for name in STEPS:
        for m in ("time", "peak"):
            stats[name][f"{m}_ratio"] = statistics.median(a / b for a, b in zip(results[name][m], results["erm"][m]))
    tokens = int(batch.attention_mask.sum())
    print(f"\n{model_name}: batch {batch.input_ids.shape[0]} x {batch.input_ids.shape[1]} ({tokens} tokens), "
          f"{reps} rounds, medians, {describe(device)}, {precision}, {torch.get_num_threads()} threads")
    print(f"{'step':<14}{'time s':>9}{'peak MiB':>10}{'step MiB':>10}{'time/erm':>10}{'peak/erm':>10}")
    for name in STEPS:
        m = stats[name]
        print(f"{name:<14}{m['time']:>9.3f}{m['peak']:>10.0f}{m['extra']:>10.0f}{m['time_ratio']:>10.2f}"
              f"{m['peak_ratio']:>10.2f}")
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "models/base"],
                    help="tiny and/or a saved base model folder (models/base is SmolLM2 after flows.student)")
    ap.add_argument("--groups", type=int, default=1, help="isomer groups per batch (x N domains sequences)")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--train", default="data/split/train.jsonl")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="float32", choices=["auto", "float32", "bfloat16"],
                    help="bf16 autocast as in training; auto: where the hardware has native bf16")
    args = ap.parse_args()
    params = load_params()
    torch.set_num_threads(params.train.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    rows = read_jsonl(args.train)
    stats = {}
    for model_name in args.models:
        stats = measure(model_name, args.groups, args.reps, params, rows, device, precision)
    n_passes, iga = stats["iga_n_passes"], stats["iga"]
    print(f"(iga with N passes / erm: time {n_passes['time_ratio']:.2f}, memory {n_passes['peak_ratio']:.2f})")
    print(f"iga/erm time ratio: {iga['time_ratio']:.2f}, memory ratio: {iga['peak_ratio']:.2f}")


if __name__ == "__main__":
    main()
