"""The teacher as an LLM behind any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama).

Three prompts from the paper (extract, instantiate, verify) plus CoT annotation of seeds that
come without a solution, candidate CoTs of an instance's problem (solve) and the validity of one
proposed CoT line (verify_step). Every response is constrained by a JSON schema and validated again on
our side: a server that ignores `response_format` gets a failed attempt, not a crash. A rejected
answer (bad JSON, schema mismatch, truncation, or a valid schema the project cannot use: a DAG with a
cycle or an unknown node, a CoT with no extractable answer) is tried again with a new sample, up to
gate.max_attempts tries, and recorded with its reason; a re-run replays the same tries, so a rejected
answer is never final. The calls themselves go through `iga.data.teacher.engine`.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from string import Template
from typing import Any, Callable, TypeVar

import jsonschema

from iga.data.answers import count_steps, extract_answer
from iga.data.dag import EDGE_LABELS, NODE_TYPES, LogicalDAG
from iga.data.teacher.base import Teacher
from iga.data.teacher.cache import cache_key
from iga.data.teacher.engine import Call, CallEngine, Pending
from iga.errors import ConfigError, DataError, TeacherError
from iga.params import Params

T = TypeVar("T")
R = TypeVar("R")

_STR = {"type": "string"}
SCHEMAS: dict[str, dict[str, Any]] = {
    "extract": {
        "type": "object", "additionalProperties": False,
        "required": ["nodes", "edges", "logical_form", "step_count"],
        "properties": {
            "nodes": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["id", "type", "description"],
                "properties": {"id": _STR, "type": {"type": "string", "enum": list(NODE_TYPES)}, "description": _STR}}},
            "edges": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["from", "to", "label"],
                "properties": {"from": _STR, "to": _STR, "label": {"type": "string", "enum": list(EDGE_LABELS)}}}},
            "logical_form": _STR, "step_count": {"type": "integer"},
        },
    },
    "instantiate": {
        "type": "object", "additionalProperties": False,
        "required": ["problem", "cot_solution", "answer", "alignment_score"],
        "properties": {"problem": _STR, "cot_solution": _STR, "answer": _STR, "alignment_score": {"type": "number"}},
    },
    "verify": {
        "type": "object", "additionalProperties": False, "required": ["alignment_score", "verdict", "issues"],
        "properties": {"alignment_score": {"type": "number", "minimum": 0, "maximum": 1},
                       "verdict": {"type": "string", "enum": ["PASS", "FAIL"]}, "issues": _STR},
    },
    "annotate": {
        "type": "object", "additionalProperties": False, "required": ["cot_solution", "answer"],
        "properties": {"cot_solution": _STR, "answer": _STR},
    },
    "solve": {  # a candidate CoT for an instance's problem (Teacher.sample)
        "type": "object", "additionalProperties": False, "required": ["cot_solution", "answer"],
        "properties": {"cot_solution": _STR, "answer": _STR},
    },
    "verify_step": {  # the validity of a proposed next CoT line (Teacher.verify_step)
        "type": "object", "additionalProperties": False, "required": ["validity", "reason"],
        "properties": {"validity": {"type": "number", "minimum": 0, "maximum": 1}, "reason": _STR},
    },
}


def load_prompt(version: str, name: str) -> str:
    path = resources.files("iga.data.teacher") / "prompts" / version / f"{name}.md"
    if not path.is_file():
        raise ConfigError(f"teacher.openai.prompt_version: no prompt {name!r} in prompts/{version}")
    return path.read_text(encoding="utf-8")


def request(params: Params, prompts: dict[str, str], name: str, attempt: int, tries: int, **variables: str) -> Call:
    """The chat.completions request of prompt `name` with its variables, and its cache key."""
    cfg = params.teacher.openai
    messages = [{"role": "system", "content": prompts["system"]},
                {"role": "user", "content": Template(prompts[name]).substitute(variables)}]
    # A per-try sampling seed: a new try asks for a different sample, a re-run for the same one.
    digest = hashlib.sha256(json.dumps([messages, attempt, tries, params.teacher.seed]).encode()).digest()
    body = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
            "seed": int.from_bytes(digest[:4], "big"),
            "response_format": {"type": "json_schema", "json_schema": {"name": name, "strict": True,
                                                                       "schema": SCHEMAS[name]}}}
    return Call(cache_key(body, cfg.prompt_version, attempt, tries), name, body)


def load_prompts(version: str) -> dict[str, str]:
    return {n: load_prompt(version, n) for n in ("system", *SCHEMAS)}


def _with_answer(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A check that the answer's CoT ends in an answer evaluation can read: the gate would drop it anyway,
    one regeneration later and at the price of a whole attempt."""
    def check(data: dict[str, Any]) -> dict[str, Any]:
        if extract_answer(data["cot_solution"]) is None:
            raise TeacherError(f'{name}: the CoT has no extractable final answer (an "Answer: ..." line)')
        return data
    return check


class OpenAITeacher(Teacher):
    provider = "openai"

    def __init__(self, params: Params, spent_usd: float = 0.0):
        super().__init__(params)
        cfg = params.teacher.openai
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ConfigError("teacher.provider is openai but OPENAI_API_KEY is not set")
        self.cfg = cfg
        self.prompts = load_prompts(cfg.prompt_version)
        budget = params.teacher.budget_usd
        self.engine = CallEngine(params, key, None if budget is None else max(0.0, budget - spent_usd))

    def close(self) -> None:
        self.engine.close()

    def ledger(self) -> list[dict[str, Any]]:
        return self.engine.ledger.rows()

    def map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """fn over items, their calls made together: replay every unfinished item until it needs a call
        that has no answer yet, fetch all those calls at once, and go again until every item is done."""
        done: dict[int, R] = {}
        while True:
            pending: dict[str, Call] = {}
            for i, item in enumerate(items):
                if i not in done:
                    try:
                        done[i] = fn(item)
                    except Pending as p:
                        pending[p.call.key] = p.call
            if not pending:
                return [done[i] for i in range(len(items))]
            self.engine.fetch(list(pending.values()))

    def _call(self, name: str, attempt: int, check: Callable[[dict[str, Any]], Any] = lambda data: data,
              **variables: str) -> Any:
        """check(answer) -> what the caller uses; a DataError or TeacherError from it rejects the try."""
        error = TeacherError(f"{name}: no tries (gate.max_attempts)")
        for tries in range(1, self.params.gate.max_attempts + 1):
            call = request(self.params, self.prompts, name, attempt, tries, **variables)
            text = self.engine.answer(call)  # TeacherError: the call failed after its retries
            try:
                return check(self._parse(name, text))
            except (TeacherError, DataError) as e:
                error = e if isinstance(e, TeacherError) else TeacherError(f"{name}: {e}")
                self.engine.ledger.reject(call.key, str(error))
        raise error

    def _parse(self, name: str, text: str) -> dict[str, Any]:
        """The JSON answer inside a chat.completion body, checked against the prompt's schema."""
        try:
            choice = json.loads(text)["choices"][0]
            finish, content = choice["finish_reason"], choice["message"]["content"]
            refusal = choice["message"].get("refusal")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise TeacherError(f"{name}: the response is not a chat completion: {text[:120]!r}") from None
        if finish == "length":
            raise TeacherError(f"{name}: truncated response (finish_reason=length, max_tokens={self.cfg.max_tokens})")
        if refusal:
            raise TeacherError(f"{name}: the model refused: {str(refusal)[:200]}")
        if finish == "content_filter":
            raise TeacherError(f"{name}: the response was withheld by a content filter")
        try:
            data = json.loads(content or "")
        except json.JSONDecodeError as e:
            raise TeacherError(f"{name}: invalid JSON in response: {e.msg} at column {e.colno}") from None
        try:
            jsonschema.validate(data, SCHEMAS[name])
        except jsonschema.ValidationError as e:
            where = "/".join(map(str, e.absolute_path)) or "(root)"
            raise TeacherError(f"{name}: response does not match the schema at {where}: {e.message[:200]}") from None
        return data

    def extract(self, seed: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
        dag = self._call("extract", attempt, lambda data: LogicalDAG.from_dict(data, f"DAG of seed {seed['seed_id']}"),
                         problem=seed["problem"])
        cot = seed.get("cot_solution") or self._call("annotate", attempt, _with_answer("annotate"),
                                                    problem=seed["problem"])["cot_solution"]
        return {"dag": dag.to_dict(), "cot_solution": cot}

    def instantiate(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, attempt: int) -> dict[str, Any]:
        data = self._call("instantiate", attempt, _with_answer("instantiate"), domain=domain, problem=seed["problem"],
                          dag=json.dumps(dag.to_dict()))
        return {"problem": data["problem"], "cot_solution": data["cot_solution"], "answer": data["answer"],
                "self_alignment_score": data["alignment_score"]}

    def verify(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, instance: dict[str, Any]) -> float:
        data = self._call("verify", 1, dag=json.dumps(dag.to_dict()), domain=domain,
                          instance_problem=instance["problem"], instance_solution=instance["cot_solution"])
        return float(data["alignment_score"])

    def candidate(self, seed: dict[str, Any], row: dict[str, Any], j: int,
                  dag: LogicalDAG | None = None) -> dict[str, Any]:
        """A new CoT for the row's problem: the solve prompt's sample j (j is in the cache key), scored by the
        verify prompt against the seed's DAG like the row itself."""
        if dag is None:
            if not seed.get("dag"):
                raise TeacherError(f"seed {seed['seed_id']}: no DAG to verify a candidate against (pass the extraction's)")
            dag = LogicalDAG.from_dict(seed["dag"], f"DAG of seed {seed['seed_id']}")
        data = self._call("solve", j, _with_answer("solve"), problem=row["problem"])
        score = self.verify(seed, dag, row["domain"], {"problem": row["problem"], "cot_solution": data["cot_solution"]})
        return {"sample": j, "style": "sampled", "flaw": None, "cot_solution": data["cot_solution"],
                "answer": data["answer"], "alignment_score": score, "step_count": count_steps(data["cot_solution"]),
                "error": None}

    def verify_step(self, seed: dict[str, Any], row: dict[str, Any], prefix: list[str], line: str) -> float:
        """The verify_step prompt's validity of `line` after `prefix` for the row's problem (cached per
        problem, prefix and line: all three are in the prompt)."""
        data = self._call("verify_step", 1, problem=row["problem"], steps="\n".join(prefix) or "(no lines yet)",
                          line=line)
        return float(data["validity"])
