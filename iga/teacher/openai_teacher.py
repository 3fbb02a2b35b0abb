"""The teacher as an LLM behind any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama).

Three prompts from the paper (extract, instantiate, verify) plus CoT annotation of seeds that
come without a solution. Every response is constrained by a JSON schema and validated again on
our side: a server that ignores `response_format` gets a failed attempt, not a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from string import Template
from typing import Any

import jsonschema
import openai

from iga.dag import EDGE_LABELS, NODE_TYPES, LogicalDAG
from iga.errors import ConfigError, DataError, TeacherError
from iga.params import Params
from iga.teacher.base import Teacher

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
}


def load_prompt(version: str, name: str) -> str:
    path = resources.files("iga.teacher") / "prompts" / version / f"{name}.md"
    if not path.is_file():
        raise ConfigError(f"teacher.openai.prompt_version: no prompt {name!r} in prompts/{version}")
    return path.read_text(encoding="utf-8")


class OpenAITeacher(Teacher):
    provider = "openai"

    def __init__(self, params: Params):
        super().__init__(params)
        cfg = params.teacher.openai
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ConfigError("teacher.provider is openai but OPENAI_API_KEY is not set")
        self.cfg = cfg
        self.prompts = {n: load_prompt(cfg.prompt_version, n) for n in ("system", *SCHEMAS)}
        self.client = openai.OpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)

    def _call(self, name: str, attempt: int, **variables: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.prompts["system"]},
                    {"role": "user", "content": Template(self.prompts[name]).substitute(variables)}]
        # A per-attempt sampling seed: a regeneration asks for a different sample, a re-run the same one.
        digest = hashlib.sha256(json.dumps([messages, attempt, self.params.teacher.seed]).encode()).digest()
        try:
            resp = self.client.chat.completions.create(
                model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens, seed=int.from_bytes(digest[:4], "big"),
                response_format={"type": "json_schema",
                                 "json_schema": {"name": name, "strict": True, "schema": SCHEMAS[name]}})
        except openai.APIStatusError as e:
            raise TeacherError(f"{name}: HTTP {e.status_code} from the teacher endpoint: {str(e.message)[:200]}") from None
        except openai.APITimeoutError:
            raise TeacherError(f"{name}: request timed out after {self.cfg.timeout_s}s") from None
        except openai.APIConnectionError as e:
            raise TeacherError(f"{name}: connection error: {str(e)[:200]}") from None
        except (openai.APIError, ValueError) as e:  # a 200 whose body is not JSON at all
            raise TeacherError(f"{name}: unreadable response body: {str(e)[:200]}") from None
        try:
            choice = resp.choices[0]
            finish, content = choice.finish_reason, choice.message.content
            refusal = getattr(choice.message, "refusal", None)
        except (AttributeError, IndexError, TypeError):
            raise TeacherError(f"{name}: the response is not a chat completion") from None
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

    def extract(self, seed: dict[str, Any]) -> dict[str, Any]:
        data = self._call("extract", 1, problem=seed["problem"])
        try:
            dag = LogicalDAG.from_dict(data, f"extracted DAG of seed {seed['seed_id']}")
        except DataError as e:
            raise TeacherError(str(e)) from None
        cot = seed.get("cot_solution") or self._call("annotate", 1, problem=seed["problem"])["cot_solution"]
        return {"dag": dag.to_dict(), "cot_solution": cot}

    def instantiate(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, attempt: int) -> dict[str, Any]:
        data = self._call("instantiate", attempt, domain=domain, problem=seed["problem"],
                          dag=json.dumps(dag.to_dict()))
        return {"problem": data["problem"], "cot_solution": data["cot_solution"], "answer": data["answer"],
                "self_alignment_score": data["alignment_score"]}

    def verify(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, instance: dict[str, Any]) -> float:
        data = self._call("verify", 1, dag=json.dumps(dag.to_dict()), domain=domain,
                          instance_problem=instance["problem"], instance_solution=instance["cot_solution"])
        return float(data["alignment_score"])
