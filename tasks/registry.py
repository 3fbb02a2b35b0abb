"""The MLflow side of a lifecycle run: a parent run, a child per method, every adapter a version of
one registered model, and the `champion` / `challenger` aliases, moved only on evidence (iga.report.promotion)."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.eval.evaluate import Decoding, for_evaluation, generate, score_adapter
from iga.eval.scores import Evaluation, summarize
from iga.hardware import resolve_device, resolve_precision
from iga.io import read_jsonl, write_jsonl
from iga.params import Params
from iga.report.promotion import best, decide
from iga.report.report import RunResult
from iga.stages import params_hash
from iga.train.decode import Stop
from tasks import tracking
from tasks.paths import BASE_MODEL, OOD, TEST, TRAIN, adapter_dir, scores_file

# The figures every version carries as tags (refreshed at each evaluation).
FIGURE_TAGS = ("id_accuracy", "ood_accuracy", "delta_gap", "nll_id", "nll_ood", "nll_gap")


class Student(mlflow.pyfunc.PythonModel):
    """A registered student: the frozen base (by path: 0.5 GB is not copied per version) plus the
    version's own LoRA adapter. predict() takes a list of problems and returns greedy completions."""

    def load_context(self, context: Any) -> None:
        from iga.train.student import load_trained

        cfg = context.model_config
        if not Path(cfg["base_dir"], "config.json").is_file():
            raise FileNotFoundError(f"{cfg['base_dir']}: the base model this version was trained on is not "
                                    f"there; rebuild it with `dvc repro student` (student.base: {cfg['base']})")
        model, self.tokenizer = load_trained(cfg["base_dir"], context.artifacts["adapter"])
        self.model = for_evaluation(model, cfg["dtype"], resolve_device("auto"))
        how = cfg["decoding"]  # as the version was evaluated: its token budget and stop rule
        self.how, self.batch_size = Decoding(how["max_new_tokens"], Stop(**how["stop"])), cfg["batch_size"]

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        return [c.text for c in generate(self.model, self.tokenizer, list(model_input), self.how, self.batch_size)]


def eval_key(params: Params) -> str:
    """What makes two versions' scores comparable problem by problem: the same held-out rows and the
    same evaluation settings on the same base model (iga.stages, "scores")."""
    dtype = resolve_precision(params.eval.dtype, resolve_device(params.train.device))  # auto: per machine
    return params_hash("scores", params, test=tracking.data_hash(TEST), ood=tracking.data_hash(OOD),
                       train=tracking.data_hash(TRAIN), dtype=dtype)  # train: an `auto` token budget comes from it


def _adapter_md5(path: Path) -> str:
    h = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _flat_metrics(result: RunResult) -> dict[str, float]:
    """Every figure of the evaluation as an MLflow metric, each interval as `<name>_lo` / `<name>_hi`."""
    ev = result.eval
    out = {k: float(ev[k]) for k in FIGURE_TAGS if k in ev}
    out |= {f"acc_{d}": float(v) for d, v in ev["domain_accuracy"].items()}
    out |= {f"nll_{d}": float(v) for d, v in ev.get("domain_nll", {}).items()}
    for depth, v in ev["lcs"].items():
        out[f"lcs_{depth}"], out[f"lcs_raw_{depth}"] = float(v["normalized"]), float(v["raw"])
    out |= {f"{name}_accuracy": float(v["accuracy"]) for name, v in ev.get("external", {}).items()}
    for name, (lo, hi) in ev.get("ci", {}).items():
        flat = name.replace(".", "_")
        out[f"{flat}_lo"], out[f"{flat}_hi"] = float(lo), float(hi)
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
    commit, data_md5, key = tracking.git_commit(), tracking.data_hash(TRAIN), eval_key(params)
    scores = {r.method: read_jsonl(scores_file(r.method)) for r in results}  # all of them, before any registration
    versions: dict[str, Any] = {}
    evaluations: dict[str, Evaluation] = {}
    with mlflow.start_run(run_name="lifecycle") as parent:
        mlflow.set_tags({"git_commit": commit, "data_md5": data_md5, "lifecycle": "parent"})
        mlflow.log_params({"methods": ",".join(r.method for r in results), "registry.model_name": name})
        for r in results:
            md5 = _adapter_md5(adapter_dir(r.method))
            with mlflow.start_run(run_name=f"{r.method}/seed{r.seed}", nested=True) as child:
                mlflow.log_params({"method": r.method, "seed": r.seed,
                                   **tracking.flat_params("method", params.methods[r.method])})
                mlflow.set_tags({"git_commit": commit, "data_md5": data_md5, "method": r.method,
                                 "train_run_id": r.train.get("mlflow_run_id", ""), "adapter_md5": md5})
                mlflow.log_metrics(_flat_metrics(r))
                mlflow.log_artifact(str(scores_file(r.method)))  # every problem's outcome, for later comparisons
                version = _version_with(client, name, md5)
                if version is None:
                    version = _new_version(params, r, md5, commit)
                    log.info("%s: registered %s version %s", r.method, name, version.version)
                else:
                    log.info("%s: adapter unchanged, already %s version %s", r.method, name, version.version)
                _tag_scores(client, name, version.version, r.method, r.eval, key, child.info.run_id)
                versions[r.method] = client.get_model_version(name, version.version)
                evaluations[version.version] = {"scores": scores[r.method]}
        state = promote(client, params, versions, evaluations)
        mlflow.set_tags({f"registry.{k}": str(v) for k, v in state.items() if k != "decision"})
    return {"parent_run_id": parent.info.run_id, "model_name": name,
            "versions": {m: v.version for m, v in versions.items()}, **state}


def _new_version(params: Params, result: RunResult, adapter_md5: str, commit: str) -> Any:
    """Log the adapter as a pyfunc model in the active run and register it, tagged with what it came from.
    The tags come with the version in one call: a run killed between the two would otherwise leave a
    version without its adapter_md5, which the next run could not find and would register again."""
    info = mlflow.pyfunc.log_model(
        name="student", python_model=Student(), artifacts={"adapter": str(adapter_dir(result.method))},
        model_config={"base_dir": str(BASE_MODEL.resolve()), "base": params.student.base, "dtype": params.eval.dtype,
                      "decoding": result.eval["decoding"], "batch_size": params.eval.batch_size},
        pip_requirements=["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2"])
    return mlflow.register_model(info.model_uri, params.registry.model_name, tags={
        "method": result.method, "seed": str(result.seed), "adapter_md5": adapter_md5, "git_commit": commit,
        "student_base": params.student.base})


def _tag_scores(client: Any, name: str, version: str, method: str, metrics: dict[str, Any], key: str,
                run_id: str) -> None:
    """The version's figures, the evaluation set they were measured on and where its per-problem scores
    are: refreshed at every evaluation, so promotion never compares stale numbers."""
    tags = {"eval_key": key, "scores_run_id": run_id, "params_hash": str(metrics.get("params_hash", "")),
            "scored_as": method, **{k: str(metrics[k]) for k in FIGURE_TAGS if k in metrics}}
    for tag, value in tags.items():
        client.set_model_version_tag(name, version, tag, value)


def _incumbent_evaluation(client: Any, params: Params, champion: Any, key: str) -> Evaluation:
    """The champion's scores on the current evaluation set: its own from the run that scored it when
    that set and its settings are unchanged, else a fresh evaluation of its registered adapter."""
    name, log = params.registry.model_name, get_run_logger()
    if champion.tags.get("eval_key") == key and champion.tags.get("scores_run_id"):
        try:
            path = mlflow.artifacts.download_artifacts(run_id=champion.tags["scores_run_id"],
                                                       artifact_path="scores.jsonl")
            return {"scores": read_jsonl(path)}
        except (MlflowException, OSError) as e:
            log.warning("champion v%s: its scores are gone (%s); scoring it again", champion.version, e)
    base = champion.tags.get("student_base")
    if base != params.student.base:
        raise Refused(f"champion v{champion.version} was trained on student.base {base!r}, the candidates on "
                      f"{params.student.base!r}: their scores are not comparable. To start afresh, delete the alias: "
                      f"MlflowClient().delete_registered_model_alias({name!r}, 'champion')")
    log.info("champion v%s was scored on another evaluation set or settings; scoring it on the current one",
             champion.version)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{champion.version}"))
    evaluation = score_adapter(params, BASE_MODEL, model_dir / "artifacts" / "adapter", read_jsonl(TEST),
                               read_jsonl(OOD), read_jsonl(TRAIN), str(TEST), f"champion v{champion.version}")
    with mlflow.start_run(run_name=f"rescore/v{champion.version}", nested=True) as run:
        with tempfile.TemporaryDirectory() as tmp:
            write_jsonl(Path(tmp) / "scores.jsonl", evaluation["scores"])
            mlflow.log_artifact(str(Path(tmp) / "scores.jsonl"))
        metrics = summarize([evaluation], evaluation["lcs_layers"])
        _tag_scores(client, name, champion.version, champion.tags.get("method", ""), metrics, key, run.info.run_id)
    return evaluation


class Refused(Exception):
    """The champion cannot be compared with the candidates; it stays, and the reason is recorded."""


def promote(client: Any, params: Params, versions: dict[str, Any], evaluations: dict[str, Evaluation]) -> dict[str, Any]:
    """Move `champion` only on evidence (iga.report.promotion), record every trial as tags on both versions,
    and point `challenger` at the best of the rest by the primary metric's point estimate."""
    rp = params.registry
    name, metric = rp.model_name, rp.primary_metric
    champion = _alias(client, name, "champion")
    pool = dict(evaluations)
    if champion is not None:
        incumbent = champion.version
        if incumbent not in pool:
            try:
                pool[incumbent] = _incumbent_evaluation(client, params, champion, eval_key(params))
            except Refused as e:
                for v in versions.values():
                    client.set_model_version_tag(name, v.version, "promotion", f"refused: {e}")
                return {"champion": incumbent, "challenger": None, "decision": [f"promotion refused: {e}"]}
    elif rp.baseline in versions:
        incumbent = versions[rp.baseline].version
    else:  # nothing to test against: the best point estimate starts the line
        incumbent = best(pool, metric)
    decision = decide(incumbent, pool, metric, rp.alpha, rp.min_delta)
    lines = []
    if champion is None:
        why = f"baseline {rp.baseline}" if rp.baseline in versions else "no baseline trained; best point estimate"
        client.set_model_version_tag(name, incumbent, "promotion", f"first champion ({why})")
        lines.append(f"v{incumbent}: first champion ({why})")
    for trial in decision.trials:
        text = f"{trial.describe(metric)}; v{trial.challenger} against v{incumbent}"
        verdict = "promoted" if trial.promoted else "held"
        client.set_model_version_tag(name, trial.challenger, "promotion", f"{verdict}: {text}")
        if trial.promoted:
            client.set_model_version_tag(name, incumbent, "promotion", f"dethroned: {text}")
        else:
            client.set_model_version_tag(name, incumbent, f"defended_against_v{trial.challenger}", text)
        lines.append(f"promotion: {verdict}: {text}")
    client.set_registered_model_alias(name, "champion", decision.winner)
    runner_up = best({v: e for v, e in pool.items() if v != decision.winner}, metric)
    if runner_up is not None:
        client.set_registered_model_alias(name, "challenger", runner_up)
    return {"champion": decision.winner, "challenger": runner_up, "decision": lines}

