"""The whole lifecycle: data → train → evaluate (one `dvc repro`) → register → report.

`python -m flows.lifecycle` runs it once and prints the results table.
`python -m flows.lifecycle serve` serves it as a Prefect deployment on `schedule.cron`.
"""
import sys

from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks import tracking
from tasks.lifecycle import clean_up_after_kills, collect, one_at_a_time, report, reproduce, summary
from tasks.registry import register

DEPLOYMENT = "scheduled"


@flow(name="lifecycle")
def lifecycle_flow(params_path: str = str(PARAMS_FILE)) -> str:
    params = load_params(params_path)
    tracking.check_reachable()  # before an hour of work, not after
    with one_at_a_time():
        clean_up_after_kills()
        reproduce()
        results = collect(params)
        registry = register(params, results)
        return summary(results, registry, report(params, results, registry))


def serve(params_path: str = str(PARAMS_FILE)) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    schedule = load_params(params_path).schedule
    # One run at a time: a run due while one goes waits in Prefect's queue (ENQUEUE) instead of starting.
    one = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    lifecycle_flow.serve(name=DEPLOYMENT, schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
                         parameters={"params_path": params_path}, global_limit=one)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        main(serve)
    else:
        print(main(lifecycle_flow))
