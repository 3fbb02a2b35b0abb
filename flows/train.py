"""`python -m flows.train <method>` trains one named method (a key of `methods` in params.yaml);
without an argument, every method in `train.methods`, one after the other.

Data-parallel: `torchrun --standalone --nproc_per_node N -m flows.train <method>`, or `train.nproc: N`,
with which `python -m flows.train` (and so the DVC stage) starts torchrun itself. Rank 0 runs the flow;
the other ranks run the same task as a plain function: one Prefect flow run per training, not per rank."""
import os
import sys

from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from iga.train.distributed import World, launched_rank
from tasks.train import train_method


@flow(name="train")
def train_flow(params_path: str = str(PARAMS_FILE), method: str | None = None) -> dict:
    params = load_params(params_path)
    return {m: train_method(params, m) for m in ([method] if method else params.train.methods)}


def peer_rank(params_path: str = str(PARAMS_FILE), method: str | None = None) -> dict:
    """A rank > 0 of a torchrun launch: the same trainings, outside Prefect."""
    params = load_params(params_path)
    return {m: train_method.fn(params, m) for m in ([method] if method else params.train.methods)}


def launch(params_path: str = str(PARAMS_FILE), method: str | None = None) -> dict:
    params = load_params(params_path)
    if method:
        params.method(method)  # an unknown name fails here, in a second, not after Prefect and torchrun start
    tp = params.train
    if tp.nproc > 1 and "LOCAL_RANK" not in os.environ:  # not yet under torchrun: become it
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={tp.nproc}", "-m", "flows.train", *sys.argv[1:]])
    # a global batch the ranks cannot share fails here, in seconds, not after Prefect and the model start
    World(size=int(os.environ.get("WORLD_SIZE", "1"))).shard(list(range(tp.groups_per_batch)))
    return (train_flow if launched_rank() == 0 else peer_rank)(params_path, method)


if __name__ == "__main__":
    main(launch, method=sys.argv[1] if len(sys.argv) > 1 else None)
