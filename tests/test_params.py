import pytest

from conftest import ROOT, write_params
from iga.data.teacher import make_teacher
from iga.errors import ConfigError
from iga.params import load_params, require_teacher_credentials


def test_project_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.gate.min_alignment == 0.85 and p.gate.max_step_diff == 2
    assert p.domains.train == ("mathematics", "medical", "legal", "science")
    assert set(p.domains.ood).isdisjoint(p.domains.train)


@pytest.mark.parametrize("key, value, message", [
    ("gate.min_alignment", 1.5, "gate.min_alignment must be in [0, 1]"),
    ("gate.max_attempts", 0, "gate.max_attempts must be >= 1"),
    ("gate.max_step_diff", "two", "gate.max_step_diff must be int"),
    ("split.unit", "group", "split.unit must be one of"),
    ("split.test_fraction", 1.0, "split.test_fraction must be in (0, 1)"),
    ("teacher.provider", "anthropic", "teacher.provider must be one of"),
    ("teacher.flaw_rate", -0.1, "teacher.flaw_rate must be in [0, 1)"),
    ("teacher.mode", "stream", "teacher.mode must be one of"),
    ("methods.sand-mask.tau", 1.0, "methods.sand-mask.tau must be in (0, 1)"),
    ("methods.and-mask.tau", 1.5, "methods.and-mask.tau must be in [0, 1]"),
    ("methods.irm.anneal_frac", 1.0, "methods.irm.anneal_frac must be in [0, 1)"),
    ("methods.vrex.penalty_weight", -1.0, "methods.vrex.penalty_weight must be >= 0"),
    ("teacher.concurrency", 0, "teacher.concurrency must be >= 1"),
    ("teacher.rpm", 0, "teacher.rpm must be > 0 or null"),
    ("teacher.budget_usd", -1, "teacher.budget_usd must be > 0 or null"),
    ("teacher.batch_discount", 0, "teacher.batch_discount must be in (0, 1]"),
    ("teacher.openai.backoff_s", 100, "teacher.openai.backoff_s must be in [0, backoff_max_s]"),
    ("seeds.max_steps", 9, "seeds.min_steps/max_steps"),
    ("seeds.families", ["arithmetic", "calculus"], "seeds.families[1] must be one of"),
    ("eval.external", {"gsm8k": {"limit": 2}, "aime": {"limit": 2}}, "eval.external.aime must be one of"),
    ("domains.ood", ["finance", "medical"], "domains.ood must not share"),
    ("seeds.source", "jsonl", "seeds.path is required"),
    ("train.methods", ["erm", "sgd"], "train.methods[1] must be a key of methods"),
    ("lora.dropout", 0.1, "lora.dropout must be 0 for method iga"),
    ("train.steps", 0, "train.steps must be >= 1"),
    ("methods.erm", {"kind": "adam"}, "methods.erm.kind must be one of"),
    ("methods.iga", {"kind": "iga", "tau": 0.5}, "missing key methods.iga.reconstruction"),
    ("methods.iga-paper.projection", "qr", "methods.iga-paper.projection must be one of"),
])
def test_invalid_values_name_the_key(tmp_path, key, value, message):
    path = write_params(tmp_path, {key: value})
    with pytest.raises(ConfigError, match=rf"{path}: params: .*{message.replace('[', '.').replace(']', '.').replace('(', '.').replace(')', '.')}"):
        load_params(path)


def test_unknown_and_missing_keys(tmp_path):
    path = write_params(tmp_path)
    text = path.read_text()
    path.write_text(text.replace("min_alignment:", "min_alignmnet:"))
    with pytest.raises(ConfigError, match="unknown key gate.min_alignmnet"):
        load_params(path)
    path.write_text(text.replace("  test_fraction: 0.2\n", ""))
    with pytest.raises(ConfigError, match="missing key split.test_fraction"):
        load_params(path)


def test_the_procedural_teacher_refuses_a_domain_it_has_no_lexicon_for(tmp_path):
    train = ["mathematics", "astrology", "legal", "science"]
    params = load_params(write_params(tmp_path, {"domains.train": train,
                                                 "teacher.cue_reliability": dict.fromkeys(train, 1.0)}))
    with pytest.raises(ConfigError, match=r"domains.train\[1\] is unknown to the procedural teacher"):
        make_teacher(params)


def test_cue_reliability_names_each_training_domain(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.cue_reliability must name each training domain once"):
        load_params(write_params(tmp_path, {"teacher.cue_reliability": {"mathematics": 0.9}}))
    with pytest.raises(ConfigError, match=r"teacher.cue_reliability.legal must be in \[0, 1\]"):
        load_params(write_params(tmp_path, {"teacher.cue_reliability": {"mathematics": 1.0, "medical": 1.0,
                                                                        "legal": 1.5, "science": 1.0}}))


def test_procedural_teacher_refuses_seeds_without_program(tmp_path):
    path = write_params(tmp_path, {"seeds.source": "gsm_symbolic"})
    with pytest.raises(ConfigError, match="teacher.provider.*needs teacher.provider: openai"):
        load_params(path)


def test_openai_without_key_fails_before_work(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    p = load_params(write_params(tmp_path, {"teacher.provider": "openai"}))
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        require_teacher_credentials(p)


def test_a_budget_needs_a_price_for_the_model(tmp_path):
    path = write_params(tmp_path, {"teacher.provider": "openai", "teacher.budget_usd": 5.0,
                                   "teacher.openai.model": "my-local-llama"})
    with pytest.raises(ConfigError, match="teacher.budget_usd needs a price for teacher.openai.model 'my-local-llama'"):
        load_params(path)
