"""Every method's training computation, bit for bit, in this tree and at another git revision.

A refactor must not change what training computes. For every method configuration in params.yaml
(the ablations included) this hashes the LoRA gradients of one step on a fixed batch of the tiny
student, and the adapter after three optimizer steps of the training loop:

    python tools/same_gradients.py --against b5ffaf2    # exit 1 unless every hash agrees

The other revision runs in a temporary git worktree, in its own process, on the same tiny base model
and rows (built once, here). Modules are looked up under their current name, then their old one.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each piece lives now -> where it lived before the phase subpackages.
MODULES = {"iga.train.methods": "iga.methods", "iga.train.student": "iga.student", "iga.train.sft": "iga.sft",
           "iga.train.loop": "iga.train", "iga.train.pergrad": "iga.pergrad", "iga.data.seeds": "iga.seeds",
           "iga.data.teacher": "iga.teacher"}


def module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return importlib.import_module(MODULES[name])


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def hashes(base: Path, rows: list[dict]) -> dict[str, str]:
    import torch

    from iga.params import load_params

    methods, student, sft = module("iga.train.methods"), module("iga.train.student"), module("iga.train.sft")
    loop, pergrad = module("iga.train.loop"), module("iga.train.pergrad")
    params = load_params(ROOT / "params.yaml")
    domains = params.domains.train
    configs = {**params.methods, "iga-n-passes": dataclasses.replace(params.methods["iga"], passes="per_domain")}

    def fresh():
        torch.manual_seed(0)
        model, tokenizer = student.load_student(base, params.lora, seed=0)
        with torch.no_grad():  # PEFT starts B at 0, which makes every gradient of A vanish
            for layer in pergrad.lora_layers(model):
                layer.B.normal_(0, 0.05)
        groups, _ = sft.encode_groups(tokenizer, sft.isomer_groups(rows, domains, "rows"), 1024)
        sampler = sft.GroupSampler(len(groups), 2, seed=0)
        return model, (lambda j: sft.collate([groups[i] for i in sampler(j)], tokenizer.pad_token_id, seed=j))

    out = {}
    for name, config in sorted(configs.items()):
        model, batch = fresh()
        methods.build_method(config, model, domains).step(batch(0))
        out[f"{name} gradients"] = digest({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        model, batch = fresh()
        tp = dataclasses.replace(params.train, steps=3, checkpoint_every=10, warmup_frac=0.0, device="cpu",
                                 precision="float32")
        with tempfile.TemporaryDirectory() as ckpt:
            loop.train(model, methods.build_method(config, model, domains), lambda s: [batch(s)], tp, Path(ckpt),
                       "fingerprint", torch.device("cpu"))
        out[f"{name} adapter after 3 steps"] = digest({n: p for n, p in model.named_parameters() if p.requires_grad})
    return out


def inputs(directory: Path) -> tuple[Path, Path]:
    from iga.params import load_params

    base, rows = directory / "tiny-base", directory / "rows.json"
    module("iga.train.student").prepare_base("tiny", base)
    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": 12, "teacher.flaw_rate": 0.0})
    teacher = module("iga.data.teacher").make_teacher(params)
    rows.write_text(json.dumps([teacher.isomer(s, teacher.extraction(s), d, 1)
                                for s in module("iga.data.seeds").procedural_seeds(params.seeds)
                                for d in params.domains.train]))
    return base, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="a git revision to compare with")
    parser.add_argument("--inputs", nargs=2, type=Path, metavar=("BASE", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inputs:  # the child process, in the other revision's tree
        print(json.dumps(hashes(args.inputs[0], json.loads(args.inputs[1].read_text()))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base, rows = inputs(Path(tmp))
        here = hashes(base, json.loads(rows.read_text()))
        if not args.against:
            print(json.dumps(here, indent=1))
            return 0
        tree = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), args.against], cwd=ROOT, check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            proc = subprocess.run([sys.executable, __file__,
                                   "--inputs", str(base), str(rows)], cwd=tree, env=env, capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"{args.against}: {proc.stderr.strip().splitlines()[-1]}")
            there = json.loads(proc.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    differ = [k for k in here if here[k] != there.get(k)]
    for key in sorted(here):
        print(f"{'same ' if key not in differ else 'DIFF '} {key}: {here[key]} {there.get(key)}")
    print(f"{len(here) - len(differ)} of {len(here)} identical to {args.against}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
