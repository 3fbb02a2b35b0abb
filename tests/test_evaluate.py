"""Evaluation: batched greedy decoding, exact-match scoring, the LCS math, and stale or empty inputs."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import ROOT, isomer_rows
from iga.errors import ConfigError, DataError
from iga.eval.evaluate import (Decoding, depth_layers, evaluate_student, generate, lcs_record, score, shared_prefix,
                               trace_cov)
from iga.params import load_params
from iga.train.decode import Stop
from iga.train.forced import teacher_forced
from iga.train.sft import encode, prompt_text
from iga.train.student import load_student, load_trained


def pairs(rows):
    return [(r["problem"], r["cot_solution"]) for r in rows]


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
    how = Decoding(12, Stop())
    batched = generate(model, tokenizer, problems, how, batch_size=3)  # 3 slots, 8 prompts: rows join and leave
    alone = [generate(model, tokenizer, [p], how, batch_size=1)[0] for p in problems]
    assert batched == alone and all(c.text for c in batched)


def test_generation_from_the_teacher_forced_pass_states_equals_encoding_the_prompts(trained):
    """Evaluation decodes held-out prompts from the states its teacher-forced pass left (the prompt opens
    the forced row): the same completions as encoding each prompt again, and the same NLL as a pass that
    keeps nothing."""
    model, tokenizer = trained
    rows = isomer_rows(2)
    how = Decoding(12, Stop())
    forced = teacher_forced(model, tokenizer, pairs(rows), 3, prime={1, 2, 5, 6, 7})
    assert [f.nll for f in forced] == [f.nll for f in teacher_forced(model, tokenizer, pairs(rows), 3)]
    assert [f.primed is not None for f in forced] == [i in {1, 2, 5, 6, 7} for i in range(len(rows))]
    primed = {i: f.primed for i, f in enumerate(forced) if f.primed is not None}
    problems = [r["problem"] for r in rows]
    assert generate(model, tokenizer, problems, how, 3, primed) == generate(model, tokenizer, problems, how, 3)
    own = len(tokenizer(prompt_text(tokenizer, problems[0]), add_special_tokens=False)["input_ids"])
    other = next(p for p in primed.values() if p.tokens != own)  # another prompt's states, of another length
    with pytest.raises(ValueError, match=f"primed with {other.tokens} tokens' states, but it has {own}"):
        generate(model, tokenizer, problems[:1], how, 3, {0: other})


def test_missing_adapter_is_a_clear_error(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="no trained adapter"):
        load_trained(tiny_base, tmp_path / "nowhere")


def test_exact_match_after_normalisation():
    rows = [{"answer": "1200", "domain": "a"}, {"answer": "yes", "domain": "a"}, {"answer": "7", "domain": "b"}]
    completions = ["Step 1: ...\nAnswer: 1,200.0", "Answer:  Yes.", "Step 1: 7 = 7\n"]  # the last has no answer
    assert score(rows, completions) == [True, True, False]


def test_nll_is_the_training_loss_of_each_row_alone(trained):
    """Batched, padded and sorted by length, each row's NLL is what training's own loss gives for
    that row on its own: the completion tokens only, in the chat template."""
    from iga.train.methods import token_losses
    from iga.train.sft import collate

    model, tokenizer = trained
    rows = isomer_rows(2)
    batched = teacher_forced(model, tokenizer, pairs(rows), batch_size=3)
    for r, (total, n) in zip(rows, [(f.nll, f.tokens) for f in batched]):
        e = encode(tokenizer, r["problem"], r["cot_solution"])
        sums, counts = token_losses(model, collate([[e]], tokenizer.pad_token_id, seed=0))
        assert n == int(counts[0]) == sum(label != -100 for label in e.labels[1:])
        assert total == pytest.approx(float(sums[0]), rel=1e-5)
    # by hand for the first row: −log p(target | prefix) over the completion tokens
    e = encode(tokenizer, rows[0]["problem"], rows[0]["cot_solution"])
    logp = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0].float(), -1)
    start = e.labels.index(next(x for x in e.labels if x != -100))
    manual = -sum(float(logp[t - 1, e.input_ids[t]]) for t in range(start, len(e.input_ids)))
    assert batched[0].nll == pytest.approx(manual, rel=1e-4)


vectors = arrays("float64", st.tuples(st.integers(2, 6), st.integers(1, 5)),
                 elements=st.floats(-100, 100, allow_nan=False, allow_infinity=False))


@given(vectors)
@settings(max_examples=60, deadline=None)
def test_trace_cov_is_half_the_mean_pairwise_squared_distance(h):
    h = torch.from_numpy(h)
    pairwise = torch.cdist(h, h).pow(2).mean() / 2
    assert trace_cov(h) == pytest.approx(float(pairwise), rel=1e-9, abs=1e-6)
    assert trace_cov(h + 3.0) == pytest.approx(trace_cov(h), rel=1e-9, abs=1e-6)  # translation invariant


DOMAINS = ("mathematics", "medical", "legal", "science")


def _lcs(model, tokenizer, group):
    layers = depth_layers(model.config.num_hidden_layers)
    shared = shared_prefix([encode(tokenizer, r["problem"], r["cot_solution"]).input_ids for r in group])
    forced = teacher_forced(model, tokenizer, pairs(group), 3, layers=layers.values(), skip=[shared] * len(group))
    return lcs_record(group, [f.states for f in forced], layers)


def test_lcs_is_zero_for_identical_variants_and_positive_for_isomers(trained):
    model, tokenizer = trained
    group = isomer_rows(1)
    clones = [dict(r, problem=group[0]["problem"], cot_solution=group[0]["cot_solution"]) for r in group]
    assert _lcs(model, tokenizer, clones)["penultimate"]["raw"] == pytest.approx(0, abs=1e-6)
    record = _lcs(model, tokenizer, group)
    assert (record["group_id"], record["seed_id"]) == (group[0]["group_id"], group[0]["seed_id"])
    for d in ("quarter", "half", "three_quarters", "penultimate"):
        assert record[d]["raw"] > 0 and 0 < record[d]["normalized"] <= 1  # unit vectors: the trace is at most 1


def test_lcs_states_skip_padding_and_the_shared_prefix(trained):
    """Each variant's state is the mean over its own tokens after the group's common prefix (chat
    template and system prompt), computed as if it ran alone: batching and padding change nothing."""
    model, tokenizer = trained
    group = isomer_rows(1)
    seqs = [encode(tokenizer, r["problem"], r["cot_solution"]).input_ids for r in group]
    shared = shared_prefix(seqs)
    assert shared > 10 and len({s[shared] for s in seqs}) > 1
    forced = teacher_forced(model, tokenizer, pairs(group), 4, layers=[1], skip=[shared] * len(group))
    for seq, state in zip(seqs, [f.states for f in forced]):
        alone = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[1][0, shared:].mean(0)
        assert torch.allclose(state[1], alone, atol=1e-5)


def test_evaluate_student_scores_every_row_and_generates_the_chosen_seeds(trained):
    model, tokenizer = trained
    rows = isomer_rows(3)
    ood = [dict(r, domain="finance") for r in rows if r["domain"] == "mathematics"]
    chosen = {rows[0]["seed_id"]}
    generate = {(r["group_id"], r["domain"]) for r in rows + ood if r["seed_id"] in chosen}
    ev = evaluate_student(model, tokenizer, rows, ood, {}, DOMAINS, to_generate=generate, how=Decoding(4, Stop()),
                          batch_size=5, nll_batch_size=3, lcs_groups=2, source="x")
    assert len(ev["scores"]) == len(rows) + len(ood) and all(r["nll"] > 0 and r["tokens"] > 0 for r in ev["scores"])
    assert {r["seed_id"] for r in ev["scores"] if r["correct"] is not None} == chosen
    assert len(ev["completions"]) == 4 + 1 and [g["seed_id"] for g in ev["lcs"]] == sorted({r["seed_id"] for r in rows})[:2]
    nll = teacher_forced(model, tokenizer, pairs(ood), 2)
    # other batches, other fp32 sums: up to 2e-7 apart measured, too near approx's default 1e-6 on other CPUs
    assert [r["nll"] for r in ev["scores"] if r["set"] == "ood"] == pytest.approx([f.nll / f.tokens for f in nll],
                                                                                  rel=1e-5)
    alone = _lcs(model, tokenizer, [r for r in rows if r["seed_id"] == ev["lcs"][0]["seed_id"]])
    assert ev["lcs"][0]["penultimate"] == pytest.approx(alone["penultimate"], rel=1e-5)


def test_cue_reliance_is_scored_on_the_generated_problems_that_carry_a_hint(trained):
    """follows_hint: whether the extracted answer is the one the planted hint states, only for generated
    problems that carry a hint; summarize turns it into hint_id / hint_ood with their intervals."""
    from iga.data.domains import DOMAINS as LEXICONS
    from iga.eval.scores import summarize

    def bare(r: dict) -> dict:  # the row without the hint the teacher may have planted
        problem = r["problem"]
        for cue in LEXICONS[r["domain"]].cues:
            problem = problem.removesuffix(f" {cue}")
        return dict(r, problem=problem)

    model, tokenizer = trained
    rows = [dict(r, problem=f"{r['problem']} {LEXICONS[r['domain']].cues[i % 2]}") if i % 3 else r
            for i, r in enumerate(map(bare, isomer_rows(4)))]
    ood = [dict(r, domain="finance", problem=f"{r['problem']} {LEXICONS['finance'].cues[0]}")
           for r in map(bare, isomer_rows(4)) if r["domain"] == "mathematics"]
    ev = evaluate_student(model, tokenizer, rows, ood, {}, DOMAINS, to_generate=None, how=Decoding(6, Stop()),
                          batch_size=8, nll_batch_size=8, lcs_groups=0, source="x")
    predicted = {(c["set"], c["id"]): c["predicted"] for c in ev["completions"]}
    for i, r in enumerate(ev["scores"]):
        hint = "yes" if r["set"] == "ood" else (None if i % 3 == 0 else ("yes", "no")[i % 2])
        expected = None if hint is None else predicted[r["set"], r["id"]] == hint
        assert r["follows_hint"] == expected, r
    summary = summarize([ev])
    hinted = [r["follows_hint"] for r in ev["scores"] if r["set"] == "test" and r["follows_hint"] is not None]
    assert summary["n_hint_id"] == len(hinted) and summary["hint_id"] == pytest.approx(sum(hinted) / len(hinted))
    assert summary["n_hint_ood"] == len(ood) and len(summary["ci"]["hint_ood"]) == 2


def test_stale_metrics_are_refused(workdir):
    from iga.stages import params_hash
    from tasks.lifecycle import load_eval_metrics
    from tasks.paths import eval_metrics

    params = load_params("params.yaml")
    with pytest.raises(DataError, match="no evaluation of erm"):
        load_eval_metrics(params, "erm")
    eval_metrics("erm").parent.mkdir(parents=True)
    eval_metrics("erm").write_text(json.dumps({"params_hash": params_hash("evaluate", params, "erm")}))
    assert load_eval_metrics(params, "erm")["params_hash"]
    changed = load_params("params.yaml", overrides={"eval.max_new_tokens": 7})
    with pytest.raises(DataError, match="another params.yaml"):
        load_eval_metrics(changed, "erm")
    assert params_hash("evaluate", load_params("params.yaml", overrides={"train.threads": 1}), "erm") == params_hash("evaluate", params, "erm")


def test_a_report_of_methods_run_in_different_precisions_is_refused(workdir):
    """`auto` precision resolves per machine: two methods trained or evaluated on different CPUs may have run
    in bf16 and fp32. The lifecycle's report names them instead of comparing them."""
    from iga.stages import params_hash
    from tasks.lifecycle import collect
    from tasks.paths import eval_metrics, history_file, train_metrics

    params = load_params("params.yaml")
    for method, precision in (("erm", "float32"), ("iga", "bfloat16")):
        for path, content in ((eval_metrics(method), {"params_hash": params_hash("evaluate", params, method),
                                                      "dtype": "float32"}),
                              (train_metrics(method), {"precision": precision}), (history_file(method), None)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("" if content is None else json.dumps(content))
    with pytest.raises(DataError, match="different train_precision cannot share a table: float32: erm; bfloat16: iga"):
        collect.fn(params)


def test_the_gap_closed_pairs_the_three_methods_problem_by_problem():
    """Scores in different orders, one problem scored by the method alone: the fraction is computed on the
    problems all three share, each matched by id (a method halfway between ERM and the oracle closes 1/2)."""
    from iga.eval.scores import gap_closed

    def ev(correct: dict[str, int], reverse: bool = False) -> dict:
        rows = [{"id": i, "seed_id": i.split("/")[0], "set": "ood", "correct": c} for i, c in correct.items()]
        return {"scores": rows[::-1] if reverse else rows, "lcs": []}

    ids = [f"s{s}/d{d}" for s in range(12) for d in range(2)]
    erm = {i: 0 for i in ids}
    oracle = {i: 1 for i in ids}
    half = {i: int(i.endswith("d0")) for i in ids} | {"s99/d0": 1}
    fraction, lo, hi, n = gap_closed([ev(half)], [ev(erm, reverse=True)], [ev(oracle)])
    assert (fraction, lo, hi, n) == (0.5, 0.5, 0.5, 24)
    with pytest.raises(DataError, match="same seeds"):
        gap_closed([ev(half), ev(half)], [ev(erm)], [ev(oracle)])
