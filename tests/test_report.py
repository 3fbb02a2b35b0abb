import re

import pytest

from iga.errors import DataError
from iga.report.report import DEPTHS, RunResult, table1, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IGA_STATS = {"mask_mean": 0.8, "mask_frac_below_half": 0.1, "vhat_mean": 1.5, "proj_residual": 0.4}


@pytest.fixture(autouse=True)
def mpl_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


def make_run(method="erm", seed=0, *, id_acc=0.61, ood_acc=0.45, lcs_norm=0.08, lcs_raw=12.3,
             external=None, steps=8) -> RunResult:
    iga = method.startswith("iga")
    eval_ = {"method": method, "params_hash": "abc", "id_accuracy": id_acc, "ood_accuracy": ood_acc,
             "delta_gap": id_acc - ood_acc, "n_id": 132, "n_ood": 66, "n_seeds": 33, "n_train_seeds": 1,
             "nll_id": 0.5, "nll_ood": 0.8, "nll_gap": 0.3,
             "domain_accuracy": {"mathematics": id_acc, "legal": ood_acc},
             "domain_nll": {"mathematics": 0.5, "legal": 0.8},
             "lcs": {d: {"layer": 2 * i + 1, "raw": lcs_raw + i, "normalized": lcs_norm + i / 100}
                     for i, d in enumerate(reversed(DEPTHS))},
             "lcs_groups": 33,
             "external": {"gsm8k": {"accuracy": 0.02, "n": 20}} if external is None else external}
    eval_["ci"] = {"id_accuracy": [id_acc - 0.05, id_acc + 0.05], "ood_accuracy": [ood_acc - 0.1, ood_acc + 0.1],
                   "delta_gap": [eval_["delta_gap"] - 0.1, eval_["delta_gap"] + 0.1], "nll_gap": [0.25, 0.35],
                   "lcs.penultimate.normalized": [lcs_norm - 0.01, lcs_norm + 0.01]}
    train = {"method": method, "steps": steps, "loss_first_quarter": 0.92, "loss_last_quarter": 0.75,
             "step_time_s_median": 3.7, "groups_train": 132,
             **({"mask_mean_avg": 0.81, "mask_frac_below_half_avg": 0.13} if iga else {})}
    history = [{"step": s, "loss": 1.0 - s / 20, "loss/legal": 1.0, "lr": 2e-4, "step_time_s": 4.2,
                **(IGA_STATS if iga else {})} for s in range(steps)]
    return RunResult(method, seed, eval_, train, history)


def rows(markdown: str) -> dict[str, list[str]]:
    """Table rows keyed by their first cell (the header row under 'Method')."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in cells if not r[0].startswith(":--")}


def test_table1_every_figure_with_its_interval_and_size():
    md = table1([make_run("erm", id_acc=0.61, ood_acc=0.45, lcs_norm=0.0812, lcs_raw=16379.34),
                 make_run("iga", id_acc=0.6, ood_acc=0.55)])
    table = rows(md)
    assert table["Method"] == ["n", "ID acc.", "OOD acc.", "Δ-Gap", "NLL ID", "NLL OOD", "NLL gap",
                               "LCS (normalised)", "LCS (raw)", "GSM8K"]
    assert table["erm"][:4] == ["132/66 of 33 seeds", "61.0 [56.0, 66.0]", "45.0 [35.0, 55.0]", "16.0 [6.0, 26.0]"]
    assert table["erm"][4:8] == ["0.500", "0.800", "0.300 [0.250, 0.350]", "0.081 [0.071, 0.091]"]
    assert table["erm"][8:] == ["16379", "2.0"]  # no interval given: the bare value; raw LCS in whole units
    assert list(table) == ["Method", "erm", "iga"]  # order of first appearance
    assert "negative gap is not better than zero" in md.splitlines()[-1]


def test_the_hint_columns_appear_where_problems_carry_hints():
    hinted = make_run("erm")
    hinted.eval.update(hint_id=0.9, hint_ood=0.7, n_hint_id=40, n_hint_ood=20)
    hinted.eval["ci"].update(hint_id=[0.85, 0.95], hint_ood=[0.6, 0.8])
    table = rows(table1([hinted, make_run("iga")]))
    assert table["Method"][-3:] == ["Follows hint ID", "Follows hint OOD", "GSM8K"]
    assert table["erm"][-3:-1] == ["90.0 [85.0, 95.0]", "70.0 [60.0, 80.0]"] and table["iga"][-3:-1] == ["–", "–"]


def test_several_seeds_need_their_combined_summary():
    runs = [make_run("iga", seed) for seed in range(3)] + [make_run("erm", 0)]
    with pytest.raises(DataError, match="several seeds per method"):
        table1(runs)
    combined = dict(make_run("iga").eval, n_train_seeds=3, id_accuracy=0.7)
    table = rows(table1(runs, {"iga": combined, "erm": runs[-1].eval}))
    assert table["iga"][:2] == ["132/66 of 33 seeds, 3 runs", "70.0 [56.0, 66.0]"]


def test_table1_missing_externals():
    runs = [make_run("erm", external={}),
            make_run("iga", external={"math_ood": {"accuracy": 0.1, "n": 20}, "gsm8k": {"accuracy": 0.05, "n": 20}})]
    table = rows(table1(runs))
    assert table["Method"][-2:] == ["GSM8K", "MATH-OOD"]  # only benchmarks some run has, paper order
    assert table["erm"][-2:] == ["–", "–"]
    assert table["iga"][-2:] == ["5.0", "10.0"]
    assert "GSM8K" not in table1([make_run(external={})])


def _evaluation(shift: float) -> list[dict]:
    scores = []
    for i in range(20):
        for s, d in (("test", "mathematics"), ("ood", "legal")):
            scores.append({"set": s, "id": f"g{i}/{d}", "seed_id": f"s{i}", "domain": d,
                           "correct": (i + (s == "ood")) % 3 > 0, "nll": 0.5 + shift + 0.01 * i, "tokens": 9})
    return [{"scores": scores}]


def test_write_report_writes_readable_pngs_and_summary(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    runs = [make_run("erm", 0), make_run("iga", 0, steps=16)]
    written = write_report(tmp_path / "report", runs, title="Smoke", notes=["tiny model"],
                           evaluations={"erm": _evaluation(0.0), "iga": _evaluation(-0.02)})
    names = [p.name for p in written]
    assert names[-1] == "summary.md"
    assert set(names) == {"accuracy.png", "lcs_layers.png", "loss.png", "mask.png", "domain_accuracy.png",
                          "summary.md"}
    for path in written[:-1]:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 300
    assert plt.get_fignums() == []  # nothing leaked into pyplot
    summary = written[-1].read_text()
    assert summary.startswith("# Smoke\n") and "- tiny model" in summary
    assert "Mask mean (avg)" in summary and "| Method | mathematics | legal |" in summary
    assert "| iga − erm | +0.0 [+0.0, +0.0], p 1 |" in summary  # identical outcomes
    assert "−0.020" not in summary and "-0.020 [-0.020, -0.020]" in summary  # NLL 0.02 lower, every problem
    assert "## What this evaluation can detect" in summary and "| iga vs erm | 20 |" in summary
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(names)  # no temporary files


def test_summary_references_only_existing_files_and_no_mask_without_iga(tmp_path):
    (tmp_path / "mask.png").write_bytes(b"stale")  # from an earlier report with IGA runs
    written = write_report(tmp_path, [make_run("erm", 0), make_run("cot", 0)])
    summary = (tmp_path / "summary.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", summary)
    assert sorted(links) == sorted(p.name for p in written[:-1])
    assert all((tmp_path / link).is_file() for link in links)
    assert not (tmp_path / "mask.png").exists() and "mask" not in summary.lower()


def test_report_is_deterministic(tmp_path):
    runs = [make_run("erm"), make_run("iga", 0, id_acc=0.7)]
    first = {p.name: p.read_bytes() for p in write_report(tmp_path / "a", runs)}
    second = {p.name: p.read_bytes() for p in write_report(tmp_path / "b", runs)}
    assert first == second


def test_empty_or_malformed_runs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no runs"):
        write_report(tmp_path, [])
    with pytest.raises(DataError, match="no runs"):
        table1([])
    broken = make_run("iga", 3)
    del broken.eval["lcs"]["penultimate"]["raw"]
    with pytest.raises(DataError, match=r"iga seed 3: eval metrics lack 'lcs.penultimate.raw'"):
        table1([broken])
    with pytest.raises(DataError, match="erm seed 0: given twice"):
        table1([make_run(), make_run()])
    assert not any(tmp_path.iterdir())
