"""`python -m flows.rank_teachers`: the named teachers of `rank_teachers.teachers`, ranked by the RSR of
their datasets under the student (reports/teachers.md)."""
from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.teachers import score_teachers, write_ranking


@flow(name="rank-teachers")
def rank_teachers_flow(params_path: str = str(PARAMS_FILE)) -> str:
    params = load_params(params_path)
    return write_ranking(params, score_teachers(params))


if __name__ == "__main__":
    print(main(rank_teachers_flow))
