"""Entry point shared by `python -m flows.<stage>`: validate params before Prefect starts (~15 s),
and turn a user-fixable error into one clear line and exit status 2."""
from __future__ import annotations

import logging
import re
import sys
from typing import Any, Callable

from iga.errors import IGAError
from iga.params import PARAMS_FILE, Params, load_params, require_teacher_credentials


def _subclasses(cls: type) -> list[type]:
    return [cls, *(s for sub in cls.__subclasses__() for s in _subclasses(sub))]


class _ExpectedErrorsOnce(logging.Filter):
    """Keeps off the console what Prefect logs about an expected error (an IGAError): the traceback and
    the failed states that repeat its message; `main` prints it once. The Prefect API still gets them."""

    def __init__(self) -> None:
        super().__init__()
        names = "|".join(c.__name__ for c in _subclasses(IGAError))
        self.mentions = re.compile(rf"exception:? ({names}):")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], IGAError):
            return False
        return not self.mentions.search(record.getMessage())


def _quiet_expected_errors() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(_ExpectedErrorsOnce())


def main(flow: Callable[..., Any], needs_teacher: bool | Callable[[Params], bool] = False, **kwargs: object) -> Any:
    """Run `flow` on params.yaml. needs_teacher: whether the stage calls the teacher (or a predicate of the
    params saying so), so that missing credentials fail here, in a second, not after Prefect's start."""
    try:
        params = load_params(PARAMS_FILE)
        if needs_teacher(params) if callable(needs_teacher) else needs_teacher:
            require_teacher_credentials(params)
        _quiet_expected_errors()
        return flow(str(PARAMS_FILE), **kwargs)
    except IGAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
