"""The one generation path (iga.train.decode): when a row stops, that stopping early only cuts what the
row would have generated anyway, and that evaluation's rule leaves every score of the demo's own
full-length completions unchanged."""
import gzip
import json
from pathlib import Path

import pytest

from conftest import isomer_rows
from iga.eval.evaluate import evaluation_stop, score
from iga.eval.external import extract_prediction, is_correct
from iga.train.decode import Stop, Watch, generate, greedy, line_end_ids, shared_kv_heads
from iga.train.sft import prompt_text
from iga.train.student import load_base, smollm2_tokenizer

DEMO = Path(__file__).parent / "data" / "demo_completions.json.gz"  # tools/full_completions.py


EVAL = Stop(answer=True)


@pytest.mark.parametrize("text, stop, reason", [
    ("Step 1: 2 + 3 = 5.\nStep 2: 5 x 2 = 10.\n", EVAL, None),
    ("Step 1: 2 + 3 = 5.\nAnswer: 10", EVAL, None),  # the answer line may go on: not complete yet
    ("Step 1: 2 + 3 = 5.\nAnswer: 10\n", EVAL, "answer"),
    ("Step 1: 2 + 3 = 5.\nfinal answer:  yes\n", EVAL, "answer"),
    ("Step 1: a.\nStep 2: a.\nStep 3: a.\nStep 4: a.\n", EVAL, None),  # a repeated step is no stop: students go on to answer
    ("\n", Stop(lines=1), "line"),
    ("Step 1", Stop(lines=1), None),
    ("Step 1: a.\n", Stop(), None),
])
def test_stop_reasons(text, stop, reason):
    assert stop.reason(text) == reason


def test_a_line_stops_at_the_first_token_past_its_limit_and_a_line_end_resets_the_count():
    class Tokenizer:  # token 0 is a line end, n > 0 is the letter n
        @staticmethod
        def decode(ids, skip_special_tokens):
            return "".join("\n" if i == 0 else chr(96 + i) for i in ids)

    watch, ids, reasons = Watch(Stop(line_tokens=3), Tokenizer, frozenset({0}), rows=1), [], []
    for token in (1, 2, 3, 0, 1, 2, 3, 4):
        ids.append(token)
        reasons.append(watch(0, ids))
    assert reasons == [None] * 7 + ["long_line"]


def test_a_stopped_row_is_the_prefix_its_rule_cuts_from_the_unstopped_one(tiny_base):
    """Greedy decoding is per row: a row stopped early holds exactly the text the rule cuts from its full
    generation, whatever else shares the batch (here 3 slots for 12 prompts: rows leave and join it)."""
    from transformers import AutoTokenizer

    model, tokenizer = load_base(tiny_base, "float32"), AutoTokenizer.from_pretrained(tiny_base)
    texts = [prompt_text(tokenizer, r["problem"]) for r in isomer_rows(3)]
    full = generate(model, tokenizer, texts, 40, 3, Stop())
    rule = Stop(line_tokens=10)  # the untrained tiny model writes no line ends: its lines run on
    stopped = generate(model, tokenizer, texts, 40, 3, rule)
    assert sum(c.stop == "long_line" for c in stopped) >= 6 and all(c.stop in ("budget", "eos") for c in full)
    for f, s in zip(full, stopped):
        if s.stop == "long_line":
            assert f.text.startswith(s.text) and s.tokens == 11 < f.tokens
        else:
            assert s == f


def test_prompts_in_any_order_decode_as_longest_first(tiny_base):
    """`greedy` takes prompts in any order: shortest first (each joining prompt longer than the cache's
    room for the next one alone), its rows are those of the longest-first order, row for row."""
    from transformers import AutoTokenizer

    model, tokenizer = load_base(tiny_base, "float32"), AutoTokenizer.from_pretrained(tiny_base)
    prompts = sorted((tokenizer(prompt_text(tokenizer, r["problem"]), add_special_tokens=False)["input_ids"]
                      for r in isomer_rows(3)), key=len)
    assert len(set(map(len, prompts))) > 3
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or tokenizer.eos_token_id
    shortest_first = greedy(model, prompts, 40, eos, pad, 3)
    longest_first = greedy(model, prompts[::-1], 40, eos, pad, 3)
    assert shortest_first == longest_first[::-1]


def test_shared_kv_heads_give_the_same_logits_and_tokens_as_their_copies(tiny_base):
    """Decoding reads the tiny student's 2 key/value heads where its 4 query heads share them (SDPA's
    enable_gqa) instead of from a copy per query head: with a padding mask, the same logits bit for bit and
    the same tokens; the switch holds only inside `shared_kv_heads`."""
    import torch
    from transformers import AutoTokenizer
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    model, tokenizer = load_base(tiny_base, "float32"), AutoTokenizer.from_pretrained(tiny_base)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    texts = [prompt_text(tokenizer, r["problem"]) for r in isomer_rows(2)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert not batch.attention_mask.all()  # padded: transformers copies the heads unless told
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or tokenizer.eos_token_id
    key = torch.zeros(1, 2, 3, 8)
    with torch.no_grad():
        copied = model(**batch).logits, greedy(model, prompts, 40, eos, pad, 3)
        assert not use_gqa_in_sdpa(batch.attention_mask, key, key)
        with shared_kv_heads():
            assert use_gqa_in_sdpa(batch.attention_mask, key, key)
            shared = model(**batch).logits, greedy(model, prompts, 40, eos, pad, 3)
        assert not use_gqa_in_sdpa(batch.attention_mask, key, key)
    assert torch.equal(shared[0], copied[0]) and shared[1] == copied[1]


def _correct(name: str, text: str, gold: str) -> bool:
    """As the evaluation scores a completion of set `name`."""
    if name in ("test", "ood"):
        return score([{"answer": gold}], [text])[0]
    return is_correct(name, extract_prediction(name, text), gold)


def test_the_evaluation_rule_changes_no_score_of_the_demos_completions():
    """The demo's students' completions of every held-out and external problem, generated in full (no early
    stop): cut where evaluation's rule stops them, token by token, each is scored as it was in full. The
    rule has work to do: it cuts tokens that could never be read."""
    demo = json.loads(gzip.open(DEMO, "rt").read())
    tokenizer = smollm2_tokenizer()
    stop, line_ends = evaluation_stop(demo["longest_line"]), line_end_ids(tokenizer)
    tokens = cut = 0
    for method, rows in demo["methods"].items():
        for row in rows:
            ids, watch = row["ids"], Watch(stop, tokenizer, line_ends, 1)
            end = next((i + 1 for i in range(len(ids)) if watch(0, ids[:i + 1])), len(ids))
            full, short = (tokenizer.decode(part, skip_special_tokens=True) for part in (ids, ids[:end]))
            assert _correct(row["set"], short, row["gold"]) == _correct(row["set"], full, row["gold"]), \
                (method, row["id"], full[len(short):][:200])
            tokens, cut = tokens + len(ids), cut + len(ids) - end
    assert cut > 0.02 * tokens, (cut, tokens)
