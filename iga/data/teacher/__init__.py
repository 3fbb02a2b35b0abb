"""Teachers turn a seed into a Logical Isomer Set: one DAG, one instance per domain."""
from iga.data.teacher.base import Teacher
from iga.data.teacher.procedural import ProceduralTeacher
from iga.params import Params

__all__ = ["Teacher", "make_teacher"]


def make_teacher(params: Params, spent_usd: float = 0.0) -> Teacher:
    """The configured teacher; `spent_usd` (earlier teacher stages of this run) counts against the budget."""
    if params.teacher.provider == "procedural":
        return ProceduralTeacher(params)
    # imported on demand: the openai client and its transport take 0.8 s to import, which the
    # default (procedural) teacher, and every module of this package, should not pay
    from iga.data.teacher.openai_teacher import OpenAITeacher

    return OpenAITeacher(params, spent_usd)
