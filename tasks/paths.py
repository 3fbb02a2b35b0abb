"""The pipeline's public files (README "Outputs"); dvc.yaml declares the same paths."""
from pathlib import Path

SEEDS = Path("data/seeds/seeds.jsonl")
DAGS = Path("data/isomers/dags.jsonl")
INSTANCES = Path("data/isomers/instances.jsonl")
ACCEPTED = Path("data/gate/accepted.jsonl")
REJECTS = Path("data/gate/rejects.jsonl")
REGENERATED = Path("data/gate/regenerated.jsonl")
GATE_DOCS = Path("data/gate/docs")
TRAIN = Path("data/split/train.jsonl")
TEST = Path("data/split/test.jsonl")
OOD = Path("data/split/ood.jsonl")
GATE_METRICS = Path("metrics/gate.json")
SPLIT_METRICS = Path("metrics/split.json")
