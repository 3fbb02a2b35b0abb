"""Teachers turn a seed into a Logical Isomer Set: one DAG, one instance per domain."""
from iga.teacher.base import Teacher, make_teacher

__all__ = ["Teacher", "make_teacher"]
