"""Promotion on evidence: the pure decision (iga.report.promotion) on synthetic scores, then on a real (sqlite)
MLflow registry: a clearly better challenger moves `champion`, a slightly better one does not, a tie
keeps it, a stale champion is scored again on the current set, a failed evaluation moves nothing;
an unreachable server fails fast."""
import json
import shutil

import numpy as np
import pytest
from prefect import flow
from scipy import stats as scipy_stats

from conftest import isomer_rows, random_adapter
from iga.errors import ConfigError, DataError
from iga.io import write_jsonl
from iga.params import load_params
from iga.report.promotion import decide


def scores(correct_ood: list[bool], nll_ood: list[float] | None = None) -> dict:
    """An evaluation with one OOD problem per test seed (and one ID problem, always right)."""
    rows = []
    for i, hit in enumerate(correct_ood):
        seed = f"s{i:03d}"
        rows.append({"set": "test", "id": f"{seed}/math", "seed_id": seed, "domain": "math", "correct": True,
                     "nll": 0.5, "tokens": 10})
        rows.append({"set": "ood", "id": f"{seed}/fin", "seed_id": seed, "domain": "fin", "correct": hit,
                     "nll": nll_ood[i] if nll_ood else 0.8, "tokens": 10})
    return {"scores": rows}


CHAMPION = [i % 2 == 0 for i in range(80)]  # 40 of 80


def test_a_clearly_better_challenger_wins_and_a_slightly_better_one_does_not():
    clearly = [True if i % 4 == 1 else hit for i, hit in enumerate(CHAMPION)]  # +20 right, none lost
    slightly = [True if i in (1, 3, 5) else hit for i, hit in enumerate(CHAMPION)]  # +3
    tie = [not hit if i < 10 else hit for i, hit in enumerate(CHAMPION)]  # 5 won, 5 lost
    d = decide("v1", {"v1": scores(CHAMPION), "v2": scores(clearly)}, "ood_accuracy", 0.05, 0.01)
    assert d.winner == "v2" and d.trials[0].promoted and d.trials[0].comparison.p < 1e-3
    assert d.trials[0].improvement == pytest.approx(0.25)
    assert "ood_accuracy +25.0 pp, 95 % CI [" in d.trials[0].describe("ood_accuracy")
    assert "n = 80 (sign-flip test over 80 test seeds)" in d.trials[0].describe("ood_accuracy")
    for other in (slightly, tie, CHAMPION):
        d = decide("v1", {"v1": scores(CHAMPION), "v2": scores(other)}, "ood_accuracy", 0.05, 0.01)
        assert d.winner == "v1" and not d.trials[0].promoted
    # significant, but below the smallest improvement worth a promotion
    d = decide("v1", {"v1": scores(CHAMPION), "v2": scores(clearly)}, "ood_accuracy", 0.05, 0.30)
    assert d.winner == "v1" and d.trials[0].comparison.p < 0.05


def clustered(rng: np.random.Generator, lift: float = 0.0, seeds: int = 40, rows: int = 6
              ) -> tuple[list[bool], list[bool]]:
    """Two methods' OOD outcomes on `seeds` test seeds of `rows` problems each, clustered as isomers are:
    a seed has a difficulty, and a method gets all its rows right or all wrong. `lift` raises the
    challenger's chance on every seed."""
    chance = rng.uniform(0.1, 0.9, seeds)
    incumbent = np.repeat(rng.random(seeds) < chance, rows)
    challenger = np.repeat(rng.random(seeds) < np.minimum(1.0, chance + lift), rows)
    return incumbent.tolist(), challenger.tolist()


def grouped(correct_ood: list[bool], rows: int = 6) -> dict:
    """An evaluation whose OOD problems come `rows` to a test seed."""
    ev = scores(correct_ood)
    for i, r in enumerate(ev["scores"]):
        r["seed_id"] = f"s{i // 2 // rows:03d}"
    return ev


def test_a_null_challenger_on_clustered_problems_is_promoted_at_most_alpha_of_the_time():
    """300 challengers no better than the incumbent, on 40 test seeds x 6 correlated OOD problems: promoted
    in <= 7 % of draws at alpha 0.05 (the test resamples seeds, not rows); a row-level test (exact McNemar)
    on the same draws promotes far more, so the data are clustered enough to tell the two apart; and a
    real clustered gain (+35 points a seed) is still promoted."""
    rng = np.random.default_rng(0)
    promoted = row_level = 0
    for _ in range(300):
        incumbent, challenger = clustered(rng)
        d = decide("v1", {"v1": grouped(incumbent), "v2": grouped(challenger)}, "ood_accuracy", 0.05, 0.0)
        promoted += d.winner == "v2"
        only_c = sum(c and not i for c, i in zip(challenger, incumbent))
        only_i = sum(i and not c for c, i in zip(challenger, incumbent))
        row_level += only_c + only_i > 0 and scipy_stats.binomtest(only_c, only_c + only_i, alternative="greater"
                                                                  ).pvalue < 0.05
    assert promoted / 300 <= 0.07 and row_level / 300 >= 0.2
    detected = sum(decide("v1", {"v1": grouped(i), "v2": grouped(c)}, "ood_accuracy", 0.05, 0.0).winner == "v2"
                   for i, c in (clustered(rng, lift=0.35) for _ in range(40)))
    assert detected / 40 >= 0.7


def test_several_challengers_are_holm_corrected_and_the_largest_gain_wins():
    better = [True if i % 4 == 1 else hit for i, hit in enumerate(CHAMPION)]
    best = [True] * 80
    d = decide("v1", {"v1": scores(CHAMPION), "v2": scores(better), "v3": scores(best)}, "ood_accuracy", 0.05, 0.01)
    assert d.winner == "v3" and [t.promoted for t in d.trials] == [False, True]
    assert all("Holm over 2" in t.comparison.test for t in d.trials)


def test_promotion_on_nll_wants_a_lower_ood_nll():
    base = [0.8 + 0.01 * (i % 7) for i in range(80)]
    lower = [v - 0.05 for v in base]
    d = decide("v1", {"v1": scores(CHAMPION, base), "v2": scores(CHAMPION, lower)}, "ood_nll", 0.05, 0.01)
    assert d.winner == "v2" and d.trials[0].improvement == pytest.approx(0.05)
    assert "nll_ood −0.050 nats/token" in d.trials[0].describe("ood_nll")
    d = decide("v1", {"v1": scores(CHAMPION, lower), "v2": scores(CHAMPION, base)}, "ood_nll", 0.05, 0.0)
    assert d.winner == "v1"


# --- on a real MLflow registry ------------------------------------------------------------------------

def test_aliases_and_tags_follow_the_decisions(tmp_path, monkeypatch):
    """promote() on real registry versions: the baseline starts the line, a clearly better challenger
    dethrones it, a slightly better one is held; both sides of every trial are tagged."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from conftest import ROOT
    from tasks import tracking
    from tasks.registry import promote

    mlflow = tracking.mlflow_module()
    try:
        client = mlflow.MlflowClient()
        client.create_registered_model("iga-student")
        v1, v2, v3 = (client.create_model_version("iga-student", source="file:///nowhere") for _ in range(3))
        params = load_params(ROOT / "params.yaml")
        clearly = [True if i % 4 == 1 else hit for i, hit in enumerate(CHAMPION)]
        slightly = [True if i in (3, 7) else hit for i, hit in enumerate(clearly)]
        state = promote(client, params, {"erm": v1, "iga": v2}, {v1.version: scores(CHAMPION),
                                                                  v2.version: scores(clearly)})
        assert state["champion"] == v2.version and state["challenger"] == v1.version
        assert client.get_model_version("iga-student", v2.version).tags["promotion"].startswith(
            "promoted: ood_accuracy +25.0 pp")
        assert client.get_model_version("iga-student", v1.version).tags["promotion"].startswith("dethroned:")
        assert state["decision"][0] == f"v{v1.version}: first champion (baseline erm)"
        state = promote(client, params, {"iga": v3}, {v2.version: scores(clearly), v3.version: scores(slightly)})
        assert state["champion"] == v2.version == client.get_model_version_by_alias("iga-student", "champion").version
        assert client.get_model_version("iga-student", v3.version).tags["promotion"].startswith("held:")
        assert f"defended_against_v{v3.version}" in client.get_model_version("iga-student", v2.version).tags
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture
def registry(workdir, monkeypatch, tiny_base, prefect_api_url):
    """A project folder with the tiny base model, a held-out split and a sqlite MLflow registry."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    shutil.copytree(tiny_base, workdir / "models/base")
    rows = isomer_rows(4)
    write_jsonl("data/split/train.jsonl", isomer_rows(2, seed=1))
    write_jsonl("data/split/test.jsonl", rows)
    write_jsonl("data/split/ood.jsonl", [dict(r, domain="finance") for r in rows if r["domain"] == "mathematics"])
    from tasks import tracking

    mlflow = tracking.mlflow_module()
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def _lifecycle(methods: list[str]) -> dict:
    """Evaluate each method's adapter, then register and promote, as the lifecycle does."""
    from iga.report.report import RunResult
    from tasks.evaluate import evaluate_method
    from tasks.registry import register

    params = load_params("params.yaml")

    @flow(name="registry-test")
    def run() -> dict:
        results = [RunResult(m, 0, evaluate_method.fn(params, m), {"mlflow_run_id": ""}, []) for m in methods]
        return register.fn(params, results)

    return run()


def test_the_registry_moves_only_on_evidence_and_rescores_a_stale_champion(registry):
    client = registry
    random_adapter("erm", 0)
    random_adapter("iga", 1)
    first = _lifecycle(["erm", "iga"])
    erm_v, iga_v = first["versions"]["erm"], first["versions"]["iga"]
    champion = client.get_model_version_by_alias("iga-student", "champion")
    assert champion.version == erm_v  # the baseline starts the line; two random adapters are no evidence
    assert champion.tags["promotion"] == "first champion (baseline erm)"
    held = client.get_model_version("iga-student", iga_v).tags["promotion"]
    assert held.startswith("held: ood_accuracy") and "95 % CI [" in held and ", n = " in held
    assert client.get_model_version_by_alias("iga-student", "challenger").version == iga_v
    assert any(line.startswith("promotion: held:") for line in first["decision"])

    # unchanged adapters: no new versions, tags refreshed, the same champion
    second = _lifecycle(["erm", "iga"])
    assert second["versions"] == first["versions"] and second["champion"] == erm_v
    assert len(client.search_model_versions("name = 'iga-student'")) == 2

    # the held-out set changes and erm is not retrained: its old scores are stale, so it is scored again
    from tasks.registry import eval_key

    old_key = champion.tags["eval_key"]
    write_jsonl("data/split/ood.jsonl", [dict(r, domain="engineering") for r in isomer_rows(3)
                                         if r["domain"] == "mathematics"])
    random_adapter("iga", 2)
    third = _lifecycle(["iga"])
    champion = client.get_model_version("iga-student", erm_v)
    new_key = eval_key(load_params("params.yaml"))
    assert new_key != old_key and champion.tags["eval_key"] == new_key
    runs = client.search_runs([client.get_experiment_by_name("iga").experiment_id],
                              f"tags.mlflow.runName = 'rescore/v{erm_v}'")
    assert len(runs) == 1 and champion.tags["scores_run_id"] == runs[0].info.run_id
    assert third["champion"] == erm_v


def test_a_failed_evaluation_moves_nothing(registry):
    from tasks.paths import scores_file

    client = registry
    random_adapter("erm", 0)
    random_adapter("iga", 1)
    _lifecycle(["erm", "iga"])
    before = client.get_model_version_by_alias("iga-student", "champion").version
    versions = len(client.search_model_versions("name = 'iga-student'"))
    random_adapter("iga", 3)
    from iga.report.report import RunResult
    from tasks.evaluate import evaluate_method
    from tasks.registry import register

    params = load_params("params.yaml")

    @flow(name="registry-test")
    def broken() -> None:
        metrics = evaluate_method.fn(params, "iga")
        scores_file("iga").unlink()  # the evaluation's scores are lost
        register.fn(params, [RunResult("iga", 0, metrics, {"mlflow_run_id": ""}, [])])

    with pytest.raises(DataError, match="scores.jsonl: file not found"):
        broken()
    assert client.get_model_version_by_alias("iga-student", "champion").version == before
    assert len(client.search_model_versions("name = 'iga-student'")) == versions  # nothing registered


def test_metric_tags_follow_the_latest_evaluation(registry):
    client = registry
    random_adapter("erm", 0)
    first = _lifecycle(["erm"])
    version = client.get_model_version("iga-student", first["versions"]["erm"])
    metrics = json.loads(open("metrics/eval/erm.json").read())
    assert float(version.tags["ood_accuracy"]) == metrics["ood_accuracy"]
    assert float(version.tags["nll_ood"]) == pytest.approx(metrics["nll_ood"])


def test_an_unreachable_tracking_server_fails_fast(monkeypatch):
    from servers import free_port
    from tasks import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ConfigError, match="unreachable"):
        tracking.check_reachable()  # before any work: MLflow's own client would retry for ~4 minutes
