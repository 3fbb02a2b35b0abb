"""Evaluation: batched greedy decoding, exact-match scoring, the LCS math, and stale or empty inputs."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import ROOT, isomer_rows
from iga.errors import ConfigError, DataError
from iga.evaluate import accuracy_report, depth_layers, generate, group_states, lcs, score, trace_cov
from iga.params import load_params
from iga.sft import encode
from iga.student import load_student, load_trained


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """A tiny student with a saved (non-zero) adapter, reloaded the way the evaluate stage does."""
    params = load_params(ROOT / "params.yaml")
    model, tokenizer = load_student(tiny_base, params.lora, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model, tokenizer = load_trained(tiny_base, path)
    return model.merge_and_unload(), tokenizer


def test_batched_generation_equals_one_at_a_time(trained):
    model, tokenizer = trained
    problems = [r["problem"] for r in isomer_rows(2)]  # prompts of different lengths: left padding matters
    batched = generate(model, tokenizer, problems, max_new_tokens=12, batch_size=8)
    alone = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in problems]
    assert batched == alone and all(batched)


def test_missing_adapter_is_a_clear_error(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="no trained adapter"):
        load_trained(tiny_base, tmp_path / "nowhere")


def test_exact_match_after_normalisation():
    rows = [{"answer": "1200", "domain": "a"}, {"answer": "yes", "domain": "a"}, {"answer": "7", "domain": "b"}]
    completions = ["Step 1: ...\nAnswer: 1,200.0", "Answer:  Yes.", "Step 1: 7 = 7\n"]  # the last has no answer
    assert score(rows, completions) == [True, True, False]
    report = accuracy_report(rows[:2], [True, True], rows[2:], [False])
    assert report["id_accuracy"] == 1.0 and report["ood_accuracy"] == 0.0 and report["delta_gap"] == 1.0
    assert report["domain_accuracy"] == {"a": 1.0, "b": 0.0}


def test_an_empty_evaluation_set_is_an_error():
    with pytest.raises(DataError, match="empty evaluation set"):
        accuracy_report([{"domain": "a"}], [True], [], [])


vectors = arrays("float64", st.tuples(st.integers(2, 6), st.integers(1, 5)),
                 elements=st.floats(-100, 100, allow_nan=False, allow_infinity=False))


@given(vectors)
@settings(max_examples=60, deadline=None)
def test_trace_cov_is_half_the_mean_pairwise_squared_distance(h):
    h = torch.from_numpy(h)
    pairwise = torch.cdist(h, h).pow(2).mean() / 2
    assert trace_cov(h) == pytest.approx(float(pairwise), rel=1e-9, abs=1e-6)
    assert trace_cov(h + 3.0) == pytest.approx(trace_cov(h), rel=1e-9, abs=1e-6)  # translation invariant


def test_lcs_is_zero_for_identical_variants_and_positive_for_isomers(trained):
    model, tokenizer = trained
    rows = isomer_rows(2)
    domains = ("mathematics", "medical", "legal", "science")
    clones = [dict(r, problem=rows[0]["problem"], cot_solution=rows[0]["cot_solution"]) for r in rows]
    assert lcs(model, tokenizer, clones, domains, 10, "clones")["lcs"]["penultimate"]["raw"] == pytest.approx(0, abs=1e-6)
    result = lcs(model, tokenizer, rows, domains, 10, "rows")
    assert result["lcs_groups"] == 2
    assert [result["lcs"][d]["layer"] for d in ("quarter", "half", "three_quarters", "penultimate")] == \
        list(depth_layers(model.config.num_hidden_layers).values())
    for v in result["lcs"].values():
        assert v["raw"] > 0 and 0 < v["normalized"] <= 1  # unit vectors: the trace is at most 1


def test_lcs_states_skip_padding_and_the_shared_prefix(trained):
    """Each variant's state is the mean over its own tokens after the group's common prefix (chat
    template and system prompt), computed as if it ran alone: padding changes nothing."""
    model, tokenizer = trained
    group = isomer_rows(1)
    seqs = [encode(tokenizer, r["problem"], r["cot_solution"]).input_ids for r in group]
    shared = next(i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1)
    assert shared > 10
    states = group_states(model, tokenizer, group, [1])[1]
    for i, seq in enumerate(seqs):
        alone = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[1][0, shared:].mean(0)
        assert torch.allclose(states[i], alone, atol=1e-5)


def test_stale_metrics_are_refused(workdir):
    from tasks.evaluate import load_eval_metrics, params_hash
    from tasks.paths import eval_metrics

    params = load_params("params.yaml")
    with pytest.raises(DataError, match="no evaluation of erm"):
        load_eval_metrics(params, "erm")
    eval_metrics("erm").parent.mkdir(parents=True)
    eval_metrics("erm").write_text(json.dumps({"params_hash": params_hash(params, "erm")}))
    assert load_eval_metrics(params, "erm")["params_hash"]
    changed = load_params("params.yaml", overrides={"eval.max_new_tokens": 7})
    with pytest.raises(DataError, match="another params.yaml"):
        load_eval_metrics(changed, "erm")
    assert params_hash(load_params("params.yaml", overrides={"train.threads": 1}), "erm") == params_hash(params, "erm")
