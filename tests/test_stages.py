"""The one dependency spec (iga/stages.py) against dvc.yaml, and the import rules that keep the
library's phases in the order of the lifecycle (docs/layout.md)."""
from __future__ import annotations

import ast
import dataclasses

import pytest
import yaml

from conftest import ROOT
from iga.params import load_params
from iga.stages import ITEM, STAGES, closure, dvc_code, dvc_params, fingerprint, params_hash, params_values

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
OUTS = {next(iter(o)) if isinstance(o, dict) else o for s in DVC.values() for o in s.get("do", s).get("outs", [])}
P = load_params(ROOT / "params.yaml")


def _body(stage: str) -> dict:
    return DVC[stage].get("do", DVC[stage])


@pytest.mark.parametrize("stage", list(DVC))
def test_dvc_yaml_lists_the_code_and_params_of_the_spec(stage):
    body = _body(stage)
    code = [d for d in body["deps"] if d not in OUTS and not d.startswith(("data/", "models/", "experiments/"))]
    expected = "\n".join(f"      - {d}" for d in dvc_code(stage))
    assert sorted(code) == dvc_code(stage), f"dvc.yaml {stage} deps: the code it runs is\n{expected}"
    assert body["params"] == dvc_params(stage), f"dvc.yaml {stage} params: the spec says {dvc_params(stage)}"


def test_every_dvc_stage_has_a_spec_and_runs_its_flow():
    for stage, spec in STAGES.items():
        if stage in DVC:
            assert _body(stage)["cmd"].split()[:3] == ["python", "-m", spec.entry[0]]
    assert set(DVC) <= set(STAGES)


def test_the_pair_stages_are_those_params_yaml_asks_for():
    from iga.experiment.pairs import REGENERATE, check, dvc_pairs, render
    from tasks.paths import PAIRS

    assert yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"] == [str(PAIRS)]
    found = yaml.safe_load((ROOT / PAIRS).read_text())["pairs"]
    assert found == dvc_pairs(P), f"run `{REGENERATE}`, or write {PAIRS} as\n{render(dvc_pairs(P))}"
    check(P, found, str(PAIRS))


def test_a_pair_stage_declares_the_outputs_the_pair_writes():
    from iga.experiment.sweep import Pair
    from tasks.paths import pair_outputs

    pair = Pair("iga-n2", 1, 2)
    for group in ("run", "sweep"):
        outs = [next(iter(o)) for o in _body(group)["outs"]]
        resolved = [o.replace("${item.run}", pair.run).replace("${item.draw}", str(pair.draw))
                    .replace("${item.seed}", str(pair.seed)) for o in outs]
        assert resolved == [str(p) for p in pair_outputs(*pair).values()]
        assert all(o[next(iter(o))] == {"cache": False} for o in _body(group)["outs"])  # committed to git


def test_settings_that_change_nothing_leave_the_hashes_alone():
    same = load_params(ROOT / "params.yaml", overrides={"train.threads": 1, "train.checkpoint_every": 7,
                                                        "eval.threads": 1, "train.methods": ["erm"]})
    for stage in ("train", "evaluate", "train-run"):
        assert params_hash(stage, same, "erm") == params_hash(stage, P, "erm")
    lr = load_params(ROOT / "params.yaml", overrides={"train.lr": P.train.lr * 2})
    assert params_hash("evaluate", lr, "erm") != params_hash("evaluate", P, "erm")  # training reaches evaluation
    tau = load_params(ROOT / "params.yaml", overrides={"methods.iga.tau": 9.0})
    assert params_hash("train", tau, "erm") == params_hash("train", P, "erm")  # another method's settings
    assert params_hash("train", tau, "iga") != params_hash("train", P, "iga")


def test_a_fingerprint_covers_code_and_inputs():
    values = params_values("train-run", P, "iga")
    assert values["methods.iga"] == dataclasses.asdict(P.methods["iga"]) and "train.threads" not in values
    assert fingerprint("train-run", P, "iga", data="a") != fingerprint("train-run", P, "iga", data="b")
    assert fingerprint("train-run", P, "iga", data="a") != params_hash("train-run", P, "iga", data="a")
    assert {"iga/core.py", "iga/combine.py", "iga/train/methods.py"} <= {str(p.relative_to(ROOT))
                                                                        for p in closure(STAGES["train-run"].entry)}
    assert all(ITEM not in k for k in params_values("train", P, "erm"))


# --- imports ----------------------------------------------------------------------------------------

# Phases in the order of the lifecycle; the top level of iga/ is the common core and the public math.
PHASES = ("data", "train", "eval", "report", "experiment")
SHARED_TASKS = {"tasks.paths", "tasks.tracking", "tasks.dvc"}  # where files are, the MLflow connection, running dvc


def _modules() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (anywhere in the file)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for package in ("iga", "tasks", "flows") for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def _phase(module: str) -> int:
    parts = module.split(".")
    return PHASES.index(parts[1]) + 1 if len(parts) > 2 and parts[1] in PHASES else 0  # 0: the common core


def test_each_phase_imports_only_from_the_phases_before_it_and_the_core():
    wrong = [f"{m} -> {i}" for m, deps in _modules().items() if m.startswith("iga.")
             for i in deps if i.startswith("iga.") and _phase(i) > _phase(m)]
    assert wrong == []


def test_no_import_circles():
    graph, state, circles = _modules(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_tasks_import_no_other_task_module_for_library_logic():
    wrong = [f"{m} -> {i}" for m, deps in _modules().items() if m.startswith("tasks.")
             for i in deps if i.startswith("tasks.") and i not in SHARED_TASKS | {"tasks"}]
    assert wrong == []


def test_the_public_math_api_is_where_users_import_it_from():
    from iga.combine import and_mask, irm_penalty, mgda, pcgrad, sand_mask, vrex_penalty  # noqa: F401
    from iga.core import conflict_mask, project_to_lora, reconstruct  # noqa: F401
    from iga.rsr import token_rank_nll, trajectory_rsr  # noqa: F401
    from iga.stats import (  # noqa: F401
        cluster_bootstrap_ci,
        detectable_difference,
        median_interval,
        paired_bootstrap_diff,
        paired_permutation_p,
    )
