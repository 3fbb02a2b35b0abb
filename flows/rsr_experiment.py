"""`python -m flows.rsr_experiment`: rank the named teachers by dataset RSR, train a student on each
teacher's data, and report how well RSR (and mean NLL, mean rank) predicts which teaches best; and train
on datasets that keep, per instance, the lowest-RSR (or lowest-NLL) of the teachers' trajectories
(reports/rsr_correlation.md)."""
from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.teachers import (held_out, score_teachers, select_across_teachers, train_and_answer, write_correlation,
                           write_ranking)


@flow(name="rsr-experiment")
def rsr_experiment_flow(params_path: str = str(PARAMS_FILE)) -> str:
    params = load_params(params_path)
    scored = score_teachers(params)
    write_ranking(params, scored)
    problems = held_out(params)
    selected = select_across_teachers(scored)
    datasets = {**{t: v["rows"] for t, v in scored.items()}, **selected}
    runs = [train_and_answer(params, name, rows, seed, problems)
            for name, rows in datasets.items() for seed in params.rank_teachers.seeds]
    return write_correlation(params, scored, selected, runs, problems)


if __name__ == "__main__":
    print(main(rsr_experiment_flow))
