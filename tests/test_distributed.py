"""Data-parallel training (torchrun, gloo, 2 ranks on the tiny student) equals the single process on the
same global batch, method by method (3 steps of 2 micro-batches of 2 groups: one group per rank), also
after a rank dies mid-run and the run resumes from its checkpoint."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_ranks import run
from iga.errors import ConfigError
from iga.train.distributed import World

HERE = Path(__file__).parent
METHODS = ["erm", "iga", "pcgrad", "vrex", "irm", "sand-mask"]


def torchrun(base: Path, out: Path, methods: list[str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_ranks.py"), str(base), str(out), ",".join(methods), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a hang fails here, not forever


def assert_same(ranks: dict[str, torch.Tensor], single: dict[str, torch.Tensor], method: str) -> None:
    assert ranks.keys() == single.keys()
    for name, a in single.items():
        assert (ranks[name] - a).norm() <= 1e-4 * a.norm(), f"{method}: {name}"


@pytest.fixture(scope="module")
def single(tiny_base, tmp_path_factory):
    """Each method's LoRA tensors after STEPS steps in one process."""
    out = tmp_path_factory.mktemp("single")
    return {m: run(m, tiny_base, out, World()) for m in METHODS}


def test_two_ranks_equal_one_process(tiny_base, single, tmp_path):
    done = torchrun(tiny_base, tmp_path, METHODS)
    assert done.returncode == 0, done.stderr[-3000:]
    for method in METHODS:
        lora = load_file(tmp_path / f"{method}.safetensors")
        assert any((lora[n] != single[method][n]).any() for n in lora), f"{method}: trained nothing?"
        assert_same(lora, single[method], method)


def test_a_dead_rank_fails_the_run_and_it_resumes_to_the_same_adapter(tiny_base, single, tmp_path):
    died = torchrun(tiny_base, tmp_path, ["iga"], "--die-at", "2")
    assert died.returncode != 0
    assert "exitcode  : 3" in died.stderr and "rank      : 1" in died.stderr, died.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "iga" / "last.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "iga.safetensors").exists()

    # the state is the same on every rank, so one process resumes the 2-rank checkpoint as well
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "one" / "checkpoints")
    assert_same(run("iga", tiny_base, tmp_path / "one" / "checkpoints", World()), single["iga"], "iga (1 rank)")

    resumed = torchrun(tiny_base, tmp_path, ["iga"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    assert_same(load_file(tmp_path / "iga.safetensors"), single["iga"], "iga")


def test_a_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match="train.groups_per_batch = 3 does not divide evenly among 2 ranks"):
        World(rank=0, size=2).shard([0, 1, 2])
