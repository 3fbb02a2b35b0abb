import json
import random

import pytest

from conftest import ROOT
from iga.data.dag import LogicalDAG
from iga.data.program import FAMILIES, Program, generate
from iga.data.seeds import gsm_symbolic_seeds, procedural_seeds, read_seed_file
from iga.errors import DataError
from iga.params import load_params


@pytest.fixture
def seeds_params():
    return load_params(ROOT / "params.yaml").seeds


def test_procedural_seeds_cover_families_and_steps(seeds_params):
    seeds = procedural_seeds(seeds_params)
    assert len(seeds) == seeds_params.n and len({s["seed_id"] for s in seeds}) == len(seeds)
    assert {s["family"] for s in seeds} == set(FAMILIES)
    for s in seeds:
        dag = LogicalDAG.from_dict(s["dag"], s["seed_id"])
        assert 2 <= dag.step_count <= 6
        assert sum(n.type == "GOAL" for n in dag.nodes) == 1
        lines = s["cot_solution"].splitlines()
        assert len(lines) == dag.step_count + 1 and lines[-1] == f"Answer: {s['answer']}"
    assert procedural_seeds(seeds_params) == seeds  # deterministic


def test_arithmetic_answers_follow_the_program():
    rng = random.Random(3)
    for _ in range(50):
        p = generate("arithmetic", rng.randint(2, 6), rng)
        vals = dict(p.givens)
        for s in p.steps:
            a = vals[s.args[0]]
            b = s.const if s.const is not None else vals[s.args[1]]
            vals[s.out] = {"add_c": a + b, "add": a + b, "sub_c": a - b, "sub": a - b, "mul_c": a * b}[s.op]
        assert p.answer() == str(vals[p.goal]) and vals[p.goal] > 0
        assert Program.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_comparison_and_implication_answers_are_balanced():
    rng = random.Random(0)
    for family in ("comparison", "implication"):
        answers = [generate(family, rng.randint(2, 6), rng).answer() for _ in range(200)]
        assert set(answers) == {"yes", "no"} and 0.3 < answers.count("yes") / 200 < 0.7


def _write(tmp_path, text):
    path = tmp_path / "seeds.jsonl"
    path.write_text(text)
    return path


def test_jsonl_seed_file(tmp_path):
    path = _write(tmp_path, '{"id": "a", "problem": "1+1?", "answer": 2}\n\n{"id": 7, "problem": "p"}\n')
    seeds = read_seed_file(path)
    assert [(s["seed_id"], s["answer"]) for s in seeds] == [("a", "2"), ("7", None)]


@pytest.mark.parametrize("text, message", [
    ('{"id": "a", "problem": "x"}\n{"id": "b", "problem": \n', ":2: invalid JSON"),
    ('{"id": "a", "problem": "x"}\n{"id": "b"}\n', ":2: missing required field 'problem'"),
    ('{"problem": "x"}\n', ":1: missing required field 'id'"),
    ('{"id": "a", "problem": "x"}\n\n{"id": "a", "problem": "y"}\n', ":3: duplicate id 'a' \\(first on line 1\\)"),
    ("", ": no seeds"),
])
def test_malformed_seed_file_names_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=f"{path}{message}"):
        read_seed_file(path)


def test_gsm_symbolic_source(seeds_params):
    from dataclasses import replace

    seeds = gsm_symbolic_seeds(replace(seeds_params, source="gsm_symbolic", n=3))
    assert len(seeds) == 3
    assert all(s["problem"] and s["answer"] and s["cot_solution"] for s in seeds)
