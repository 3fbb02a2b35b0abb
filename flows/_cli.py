"""Entry point shared by `python -m flows.<stage>`: validate params before Prefect starts (~15 s),
and turn a user-fixable error into one clear line and exit status 2."""
from __future__ import annotations

import sys
from typing import Any, Callable

from iga.errors import IGAError
from iga.params import PARAMS_FILE, load_params, require_teacher_credentials


def main(flow: Callable[..., Any], needs_teacher: bool = False, **kwargs: object) -> Any:
    try:
        params = load_params(PARAMS_FILE)
        if needs_teacher:
            require_teacher_credentials(params)
        return flow(str(PARAMS_FILE), **kwargs)
    except IGAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
