"""The `student` and `train` flows on real Prefect and MLflow (sqlite in the work dir), tiny student;
and a `kill -9` of the training process, then a re-run that resumes to the same adapter."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import isomer_rows, write_params
from ddp_ranks import distance, norm, other_order, tolerance
from iga.io import read_jsonl, write_jsonl
from tasks.paths import BASE_MODEL, SELECTED, adapter_dir, checkpoint_dir, history_file, train_metrics

IGA_METRICS = {"loss", "lr", "step_time_s", "mask_mean", "mask_frac_below_half", "vhat_mean", "proj_residual",
               "loss/mathematics", "loss/science"}


@pytest.fixture
def trainable_dir(prefect_api_url, workdir):
    from flows.student import student_flow

    write_jsonl(SELECTED, isomer_rows(10))  # what the select stage hands to training
    student_flow("params.yaml")
    return workdir


def test_train_flow_writes_adapters_metrics_and_mlflow_runs(trainable_dir):
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.train import train_flow

    result = train_flow("params.yaml")
    assert set(result) == {"erm", "iga"}
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    for method, summary in result.items():
        assert (adapter_dir(method) / "adapter_config.json").is_file()
        assert len(history_file(method).read_text().splitlines()) == 4
        assert train_metrics(method).is_file() and summary["steps"] == 4
        assert not checkpoint_dir(method).exists()  # done: the next run of the stage starts afresh
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == method
        assert run.data.params["train.lr"] == "0.001" and run.data.params["lora.r"] == "16"
        assert run.data.tags["git_commit"] and len(run.data.tags["data_md5"]) == 32
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
        assert "adapter" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert IGA_METRICS <= set(client.get_run(result["iga"]["mlflow_run_id"]).data.metrics)
    assert "mask_mean" not in client.get_run(result["erm"]["mlflow_run_id"]).data.metrics
    # the adapter is a plain peft adapter over the saved base, and it generates
    base = AutoModelForCausalLM.from_pretrained("models/base")
    model = PeftModel.from_pretrained(base, str(adapter_dir("iga")))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir("iga"))
    ids = tokenizer("Step 1:", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_killed_training_resumes_to_the_same_adapter(trainable_dir, prefect_api_url):
    """kill -9 mid-run, re-run: it resumes from the last checkpoint and ends where an uninterrupted run ends."""
    from flows.train import train_flow

    # killed as soon as the first checkpoint (step 10) lands: 50 steps leave ample time to see it first
    write_params(trainable_dir, {"train.steps": 60, "train.checkpoint_every": 10})
    train_flow("params.yaml", method="iga")
    reference = load_file(adapter_dir("iga") / "adapter_model.safetensors")
    for path in (adapter_dir("iga"), checkpoint_dir("iga")):
        subprocess.run(["rm", "-rf", str(path)], check=True)

    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    cmd = [sys.executable, "-m", "flows.train", "iga"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = checkpoint_dir("iga") / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=False)
    assert 0 < killed_at["step"] < 60 and not adapter_dir("iga").exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {checkpoint_dir('iga')} at step {killed_at['step']}" in done.stderr + done.stdout
    resumed = load_file(adapter_dir("iga") / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    summary = json.loads(train_metrics("iga").read_text())
    assert summary["mlflow_run_id"] == killed_at["extra"]["mlflow_run_id"]  # one MLflow run, continued


def test_unknown_method_is_one_clear_error(trainable_dir, prefect_api_url):
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    proc = subprocess.run([sys.executable, "-m", "flows.train", "nope"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "error: params: no method 'nope' under methods" in proc.stderr


def reordered_single(method: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(start, end): the adapter before and after `method`'s training as tasks/train.py runs it in one process
    on params.yaml, but with every micro-batch's rows in another order and padded wider (ddp_ranks.other_order),
    the same computation with other rounding: its distance from the flow's adapter is that training's own
    rounding noise. Keyed as the saved adapter."""
    from peft import get_peft_model_state_dict

    from iga.params import load_params
    from iga.train.loop import train
    from iga.train.methods import build_method
    from iga.train.sft import batcher, encode_groups, isomer_groups
    from iga.train.student import load_student

    params = load_params("params.yaml")
    tp = params.train
    model, tokenizer = load_student(BASE_MODEL, params.lora, params.student.dtype, seed=tp.seed)
    start = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    groups, _ = encode_groups(tokenizer, isomer_groups(read_jsonl(SELECTED), params.domains.train, "rows"),
                              tp.max_length)
    shares = batcher(groups, tp, tp.groups_per_batch, tokenizer.pad_token_id)
    train(model, build_method(params.methods[method], model, params.domains.train),
          lambda step: [other_order(b, tokenizer.pad_token_id) for b in shares(step)], tp, checkpoint_dir("noise"),
          "noise", torch.device("cpu"))
    return start, {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_two_ranks_write_the_single_process_adapter(trainable_dir, prefect_api_url):
    """`train.nproc: 2` makes `python -m flows.train` (the DVC stage's command) start torchrun; its adapter
    equals the single process's on the same global batch, and a batch that does not divide is refused.
    "Equals": within ddp_ranks.tolerance of the training's own rounding noise, as in test_distributed.py (here in
    float32, pinned: `auto` would be bf16 autocast on some CPUs and not on others)."""
    from flows.train import train_flow

    setting = {"train.steps": 3, "train.groups_per_batch": 2, "train.precision": "float32"}
    write_params(trainable_dir, setting)
    train_flow("params.yaml", method="iga")
    single = load_file(adapter_dir("iga") / "adapter_model.safetensors")
    assert json.loads(train_metrics("iga").read_text())["world_size"] == 1
    start, noisy = reordered_single("iga")
    noise, moved = distance(noisy, single), distance(single, start)
    assert noise <= moved / 1000, (noise, moved)  # the reference is this training, in another rounding

    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    write_params(trainable_dir, {**setting, "train.nproc": 2})
    done = subprocess.run([sys.executable, "-m", "flows.train", "iga"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = load_file(adapter_dir("iga") / "adapter_model.safetensors")
    d, bound = distance(ranks, single), tolerance(noise, norm(single), torch.float32)
    words = (f"‖2 ranks − 1‖ = {d:.3g} = {d / noise if noise else math.inf:.3g} × the noise {noise:.3g} (‖a‖ "
             f"{norm(single):.3g}), bound {bound:.3g}; training moved the adapter {moved:.3g}")
    print(words)
    assert d <= bound, words
    assert json.loads(train_metrics("iga").read_text())["world_size"] == 2

    write_params(trainable_dir, {**setting, "train.groups_per_batch": 3})
    refused = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "flows.train", "iga"], env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0
    assert "error: train.groups_per_batch = 3 does not divide evenly among 2 ranks" in refused.stderr
