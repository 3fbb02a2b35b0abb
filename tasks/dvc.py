"""Running `dvc` from a flow: the lifecycle's `dvc repro evaluate` and the experiment's matrix."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import get_client

from iga.errors import IGAError


def dvc(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """`dvc <args>` with this interpreter's tools on PATH (stages run `python -m flows.<stage>`) and this run's
    Prefect API, a temporary server or a real one (stages report there and skip their own ~15 s start-up).
    A failure raises, naming the command and, when the output was captured, its last error line."""
    bin_dir = str(Path(sys.executable).parent)
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    env = os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PREFECT_API_URL": api_url}
    proc = subprocess.run([f"{bin_dir}/dvc", *args], env=env, capture_output=capture, text=True)
    if proc.returncode:
        detail = f": {proc.stderr.strip().splitlines()[-1]}" if capture and proc.stderr.strip() else " (output above)"
        raise IGAError(f"dvc {' '.join(args)} failed with exit status {proc.returncode}{detail}")
    return proc
