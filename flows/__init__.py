"""Prefect flows: one per DVC stage (`python -m flows.<stage>`), plus `flows.data` for all four.

Set here, before any flow imports Prefect, so that they hold however a stage is started (`dvc repro`,
`python -m flows.<stage>`, `make`): no usage reporting from Prefect's server, MLflow, GX or DVC, and
time for a fresh Prefect home's first start (~35 s here, over Prefect's 20 s default). A value
already in the environment wins.
"""
import os

for _name, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "true",
                      "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_name, _value)
