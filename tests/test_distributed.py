"""Data-parallel training (torchrun, gloo, 2 ranks on the tiny student) equals the single process on the
same global batch, method by method (3 steps of 2 micro-batches of 2 groups: one group per rank), also
after a rank dies mid-run and the run resumes from its checkpoint; and the check has the power to catch
a missing per-module reduce.

"Equals" up to rounding, and rounding differs from CPU to CPU (AVX2, AVX-512 and AMX sum in other orders),
so no constant tolerance is used. The student runs in float64 (tests/ddp_ranks.py), and each method's bound
comes from its own rounding noise: the distance between the single process and the single process again
with every micro-batch's rows in another order and padded wider (ddp_ranks.other_order), the same
computation with other sums and other matrix shapes, which is what two ranks change too."""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_ranks import DTYPE, Trained, distance, norm, run, tolerance
from iga.errors import ConfigError
from iga.train.distributed import World

HERE = Path(__file__).parent
# every method that runs data-parallel (README: "data-parallel training, every method"): each kind once
METHODS = ["erm", "iga", "pcgrad", "vrex", "irm", "sand-mask", "and-mask", "pareto-gs", "vcd"]


def torchrun(base: Path, out: Path, methods: list[str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_ranks.py"), str(base), str(out), ",".join(methods), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a hang fails here, not forever


class Reference:
    """Each method's single-process run and its noise run, each in a process of its own (one thread each, so
    that the two and the two ranks share the cores), run once, when a test first asks."""

    def __init__(self, base: Path, out: Path):
        self.base, self.out, self.ready = base, out, set()

    def start(self, methods: list[str]) -> list[subprocess.Popen]:
        todo = [m for m in methods if m not in self.ready]
        if not todo:
            return []
        return [subprocess.Popen([sys.executable, str(HERE / "ddp_ranks.py"), str(self.base), str(self.out / kind),
                                  ",".join(todo), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for kind, extra in (("single", ()), ("noise", ("--reorder",)))]

    def wait(self, runs: list[subprocess.Popen], methods: list[str]) -> None:
        for proc in runs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
        self.ready.update(methods)

    def _load(self, kind: str, method: str) -> Trained:
        if method not in self.ready:
            self.wait(self.start([method]), [method])
        files = {what: self.out / kind / f"{method}{suffix}.safetensors"
                 for what, suffix in (("start", ".start"), ("lora", ""), ("grad0", ".grad0"))}
        return Trained(**{what: load_file(path) for what, path in files.items()})

    def single(self, method: str) -> Trained:
        return self._load("single", method)

    def noise(self, method: str) -> Trained:
        return self._load("noise", method)

    def check(self, got: dict[str, torch.Tensor], method: str, what: str = "lora") -> tuple[float, float, str]:
        """(distance of `got` from the single process's `what`, its bound, the measurements in words)."""
        ref, noisy = getattr(self.single(method), what), getattr(self.noise(method), what)
        d, noise, size = distance(got, ref), distance(noisy, ref), norm(ref)
        bound = tolerance(noise, size, getattr(torch, DTYPE))
        return d, bound, (f"{method} ({what}): ‖it − one process‖ = {d:.3g} = {d / size:.3g} of the norm = "
                          f"{d / noise if noise else math.inf:.3g} × the noise {noise:.3g} ({noise / size:.3g} of the "
                          f"norm); bound {bound:.3g} ({d / bound:.3g} of it)")

    def assert_same(self, got: dict[str, torch.Tensor], method: str, what: str = "lora") -> None:
        d, bound, words = self.check(got, method, what)
        print(words)
        assert d <= bound, words


@pytest.fixture(scope="module")
def reference(tiny_base, tmp_path_factory):
    return Reference(tiny_base, tmp_path_factory.mktemp("reference"))


def test_two_ranks_equal_one_process(tiny_base, reference, tmp_path):
    references = reference.start(METHODS)  # meanwhile
    try:
        done = torchrun(tiny_base, tmp_path, METHODS)
    finally:
        reference.wait(references, METHODS)
    assert done.returncode == 0, done.stderr[-3000:]
    for method in METHODS:
        single = reference.single(method)
        lora = load_file(tmp_path / f"{method}.safetensors")
        # the bound is far below what training moved the adapter: a lost update cannot hide in it
        _, bound, words = reference.check(lora, method)
        assert distance(single.lora, single.start) >= 1000 * bound, f"{method}: trained too little to tell; {words}"
        reference.assert_same(load_file(tmp_path / f"{method}.grad0.safetensors"), method, "grad0")  # step 0 exactly
        reference.assert_same(lora, method)  # after three steps


def test_a_missing_reduce_fails_the_check_by_orders_of_magnitude(tiny_base, reference, tmp_path):
    """The power of the check above: IGA's owner of each module runs on its own share of the per-domain
    gradients instead of their sum (ddp_ranks --mutate drop-reduce), and misses by far more than the bound."""
    done = torchrun(tiny_base, tmp_path, ["iga"], "--mutate", "drop-reduce")
    assert done.returncode == 0, done.stderr[-3000:]
    for what in ("grad0", "lora"):
        got = load_file(tmp_path / ("iga.grad0.safetensors" if what == "grad0" else "iga.safetensors"))
        d, bound, words = reference.check(got, "iga", what)
        print(words)
        assert d >= 1000 * bound, words


def test_a_dead_rank_fails_the_run_and_it_resumes_to_the_same_adapter(tiny_base, reference, tmp_path):
    died = torchrun(tiny_base, tmp_path, ["iga"], "--die-at", "2")
    assert died.returncode != 0
    assert "exitcode  : 3" in died.stderr and "rank      : 1" in died.stderr, died.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "iga" / "last.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "iga.safetensors").exists()

    # the state is the same on every rank, so one process resumes the 2-rank checkpoint as well
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "one" / "checkpoints")
    one = run("iga", tiny_base, tmp_path / "one" / "checkpoints", World())
    assert one.grad0 is None  # resumed at step 2
    reference.assert_same(one.lora, "iga")

    resumed = torchrun(tiny_base, tmp_path, ["iga"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    reference.assert_same(load_file(tmp_path / "iga.safetensors"), "iga")


def test_a_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match="train.groups_per_batch = 3 does not divide evenly among 2 ranks"):
        World(rank=0, size=2).shard([0, 1, 2])
