"""The MLflow side of a lifecycle run: a parent run, a child per method, every adapter a version of
one registered model, and the `champion` / `challenger` aliases moved only on OOD accuracy."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.params import Params
from iga.report import RunResult
from tasks import tracking
from tasks.paths import BASE_MODEL, TRAIN, adapter_dir

PROMOTION_METRIC = "ood_accuracy"  # champion = best out-of-domain accuracy (the paper's claim)


class Student(mlflow.pyfunc.PythonModel):
    """A registered student: the frozen base (by path: 0.5 GB is not copied per version) plus the
    version's own LoRA adapter. predict() takes a list of problems and returns greedy completions."""

    def load_context(self, context: Any) -> None:
        from iga.student import load_trained

        cfg = context.model_config
        if not Path(cfg["base_dir"], "config.json").is_file():
            raise FileNotFoundError(f"{cfg['base_dir']}: the base model this version was trained on is not "
                                    f"there; rebuild it with `dvc repro student` (student.base: {cfg['base']})")
        model, self.tokenizer = load_trained(cfg["base_dir"], context.artifacts["adapter"])
        self.model = model.merge_and_unload().to(getattr(torch, cfg["dtype"]))
        self.max_new_tokens, self.batch_size = cfg["max_new_tokens"], cfg["batch_size"]

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from iga.evaluate import generate

        return generate(self.model, self.tokenizer, list(model_input), self.max_new_tokens, self.batch_size)


def _adapter_md5(path: Path) -> str:
    h = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _flat_metrics(result: RunResult) -> dict[str, float]:
    ev = result.eval
    out = {k: float(ev[k]) for k in ("id_accuracy", "ood_accuracy", "delta_gap")}
    out |= {f"acc_{d}": float(v) for d, v in ev["domain_accuracy"].items()}
    for depth, v in ev["lcs"].items():
        out[f"lcs_{depth}"], out[f"lcs_raw_{depth}"] = float(v["normalized"]), float(v["raw"])
    out |= {f"{name}_accuracy": float(v["accuracy"]) for name, v in ev.get("external", {}).items()}
    out |= {f"train_{k}": float(v) for k, v in result.train.items() if isinstance(v, float)}
    return out


def _version_with(client: Any, name: str, adapter_md5: str) -> Any | None:
    """An existing version of this very adapter: a scheduled re-run that changed nothing adds none."""
    versions = client.search_model_versions(f"name = '{name}' and tag.adapter_md5 = '{adapter_md5}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _alias(client: Any, name: str, alias: str) -> Any | None:
    """The version an alias points at; None when the alias (or the model) does not exist yet."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _score(version: Any) -> tuple[float, float]:
    tags = version.tags
    return float(tags[PROMOTION_METRIC]), float(tags["id_accuracy"])


@task(cache_policy=NO_CACHE)
def register(params: Params, results: list[RunResult]) -> dict[str, Any]:
    """Log the lifecycle run and register its adapters; returns the parent run id and the registry's state.

    Every metrics file has been checked against params.yaml before this runs, so a failed or stale
    evaluation never reaches the aliases.
    """
    log = get_run_logger()
    tracking.mlflow_module()
    client = mlflow.MlflowClient()
    name = params.registry.model_name
    commit, data_md5 = tracking.git_commit(), tracking.data_hash(TRAIN)
    versions: dict[str, Any] = {}
    with mlflow.start_run(run_name="lifecycle") as parent:
        mlflow.set_tags({"git_commit": commit, "data_md5": data_md5, "lifecycle": "parent"})
        mlflow.log_params({"methods": ",".join(r.method for r in results), "registry.model_name": name})
        for r in results:
            md5 = _adapter_md5(adapter_dir(r.method))
            with mlflow.start_run(run_name=f"{r.method}/seed{r.seed}", nested=True):
                mlflow.log_params({"method": r.method, "seed": r.seed,
                                   **tracking.flat_params("method", params.methods[r.method])})
                mlflow.set_tags({"git_commit": commit, "data_md5": data_md5, "method": r.method,
                                 "train_run_id": r.train.get("mlflow_run_id", ""), "adapter_md5": md5})
                mlflow.log_metrics(_flat_metrics(r))
                version = _version_with(client, name, md5)
                if version is None:
                    version = _new_version(client, params, r, md5, commit)
                    log.info("%s: registered %s version %s", r.method, name, version.version)
                else:
                    log.info("%s: adapter unchanged, already %s version %s", r.method, name, version.version)
                versions[r.method] = version
        state = promote(client, name, list(versions.values()))
        mlflow.set_tags({f"registry.{k}": str(v) for k, v in state.items()})
    return {"parent_run_id": parent.info.run_id, "model_name": name,
            "versions": {m: v.version for m, v in versions.items()}, **state}


def _new_version(client: Any, params: Params, result: RunResult, adapter_md5: str, commit: str) -> Any:
    """Log the adapter as a pyfunc model in the active run, register it, and tag the version with
    what promotion compares (and what it came from)."""
    name = params.registry.model_name
    info = mlflow.pyfunc.log_model(
        name="student", python_model=Student(), artifacts={"adapter": str(adapter_dir(result.method))},
        model_config={"base_dir": str(BASE_MODEL.resolve()), "base": params.student.base, "dtype": params.eval.dtype,
                      "max_new_tokens": params.eval.max_new_tokens, "batch_size": params.eval.batch_size},
        pip_requirements=["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2"], registered_model_name=name)
    version = str(info.registered_model_version)
    tags = {"method": result.method, "seed": str(result.seed), "adapter_md5": adapter_md5, "git_commit": commit,
            "params_hash": result.eval["params_hash"],
            **{k: str(result.eval[k]) for k in ("id_accuracy", "ood_accuracy", "delta_gap")}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return client.get_model_version(name, version)


def promote(client: Any, name: str, candidates: list[Any]) -> dict[str, Any]:
    """Move `champion` to the best candidate only when it beats the current champion on OOD accuracy
    (ties keep the incumbent); record the comparison as tags on both; `challenger` = the runner-up."""
    champion = _alias(client, name, "champion")
    pool = {v.version: v for v in candidates} | ({champion.version: champion} if champion else {})
    ranked = sorted(pool.values(), key=_score, reverse=True)
    best = ranked[0]
    if champion is None:
        client.set_registered_model_alias(name, "champion", best.version)
        client.set_model_version_tag(name, best.version, "promotion", "first champion")
        winner = best
    elif best.version != champion.version and _score(best) > _score(champion):
        verdict = (f"{PROMOTION_METRIC} {_score(best)[0]:.4f} > {_score(champion)[0]:.4f} "
                   f"(v{best.version} over v{champion.version})")
        client.set_registered_model_alias(name, "champion", best.version)
        client.set_model_version_tag(name, best.version, "promotion", f"beat champion: {verdict}")
        client.set_model_version_tag(name, champion.version, "promotion", f"dethroned: {verdict}")
        winner = best
    else:
        winner = champion
        for v in candidates:
            if v.version != champion.version:
                verdict = (f"{PROMOTION_METRIC} {_score(v)[0]:.4f} <= {_score(champion)[0]:.4f} "
                           f"(v{v.version} against v{champion.version})")
                client.set_model_version_tag(name, v.version, "promotion", f"lost to champion: {verdict}")
                client.set_model_version_tag(name, champion.version, f"defended_against_v{v.version}", verdict)
    runner_up = next((v for v in ranked if v.version != winner.version), None)
    if runner_up is not None:
        client.set_registered_model_alias(name, "challenger", runner_up.version)
    return {"champion": winner.version, "challenger": runner_up.version if runner_up else None}

