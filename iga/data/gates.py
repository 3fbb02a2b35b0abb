"""Quality gates (paper §3.3) with Great Expectations as the source of truth.

Two stages, as in the paper: instance gates (teacher error, required fields, an extractable
answer, known domain, alignment >= gate.min_alignment) on every row, then group gates (every
training domain present, CoT step-count spread <= gate.max_step_diff) on the rows that passed.
Rejected rows are read from GX's `unexpected_index_list`, keyed by (group_id, domain).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from iga.data.answers import extract_answer
from iga.params import DomainsParams, GateParams

Key = tuple[str, str]  # (group_id, domain)
KEY_COLUMNS = ["group_id", "domain"]
INCOMPLETE = "incomplete_group"
REQUIRED = ("seed_id", "problem", "cot_solution", "answer")


class Gate:
    """One ephemeral GX context per gate run, so every validation lands in one Data Docs site."""

    def __init__(self, gate: GateParams, domains: DomainsParams, docs_dir: str | Path | None = None):
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.checkpoint import UpdateDataDocsAction
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.domains = domains
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        actions = []
        if docs_dir is not None:
            ctx.add_data_docs_site(site_name="gate", site_config={
                "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(Path(docs_dir).resolve())}})
            actions = [UpdateDataDocsAction(name="data_docs", site_names=["gate"])]
        asset = ctx.data_sources.add_pandas("isomers").add_dataframe_asset("instances")
        batch = asset.add_batch_definition_whole_dataframe("all_rows")

        def reason(r: str) -> dict[str, str]:
            return {"reason": r}

        instance = [
            gxe.ExpectColumnValuesToBeNull(column="error", meta=reason("teacher_error")),
            *(gxe.ExpectColumnValuesToNotBeNull(column=c, meta=reason(f"missing_{c}"))
              for c in (*REQUIRED, "alignment_score")),
            gxe.ExpectColumnValuesToNotBeNull(column="extracted_answer", meta=reason("no_extractable_answer")),
            gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=list(domains.all), meta=reason("unknown_domain")),
            gxe.ExpectColumnValuesToBeBetween(column="alignment_score", min_value=gate.min_alignment, max_value=1.0,
                                              meta=reason("low_alignment")),
        ]
        n_train = len(domains.train)
        group = [
            gxe.ExpectColumnValuesToBeBetween(column="group_train_domains", min_value=n_train, max_value=n_train,
                                              meta=reason(INCOMPLETE)),
            gxe.ExpectColumnValuesToBeBetween(column="group_step_spread", min_value=0, max_value=gate.max_step_diff,
                                              meta=reason("step_spread")),
        ]
        self._checkpoints = {}
        for name, expectations in (("instance_gate", instance), ("group_gate", group)):
            suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
            vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
            self._checkpoints[name] = ctx.checkpoints.add(gx.Checkpoint(
                name=name, validation_definitions=[vd], actions=actions,
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": KEY_COLUMNS}))

    def validate(self, rows: list[dict[str, Any]]) -> dict[Key, list[str]]:
        """Reasons for every rejected (group_id, domain); rows absent from the result passed."""
        # Blank text is as missing as null; the answer must be extractable the way evaluation extracts it.
        rows = [{k: None if isinstance(v, str) and not v.strip() else v for k, v in r.items()}
                | {"extracted_answer": extract_answer(r.get("cot_solution"))} for r in rows]
        df = pd.DataFrame(rows, columns=list(dict.fromkeys([*KEY_COLUMNS, *REQUIRED, "alignment_score", "step_count",
                                                           "error", "extracted_answer"])))
        keys = list(zip(df["group_id"], df["domain"]))
        if len(set(keys)) != len(keys):
            raise ValueError("gate input must hold one row per (group_id, domain)")
        rejected = _run(self._checkpoints["instance_gate"], df)
        passed = df[[k not in rejected for k in keys]]
        if len(passed):
            for key, reasons in _run(self._checkpoints["group_gate"], self._group_columns(passed)).items():
                rejected.setdefault(key, []).extend(reasons)
        return rejected

    def _group_columns(self, df: pd.DataFrame) -> pd.DataFrame:
        # GX has no "max - min <= k" or "distinct count == n" per group: derive the columns it checks.
        df = df.copy()
        train = df[df["domain"].isin(self.domains.train)]
        n_train = train.groupby("group_id")["domain"].nunique()
        df["group_train_domains"] = df["group_id"].map(n_train).fillna(0).astype(int)
        steps = df.groupby("group_id")["step_count"]
        df["group_step_spread"] = df["group_id"].map(steps.max() - steps.min()).astype(int)
        return df


def _run(checkpoint: Any, df: pd.DataFrame) -> dict[Key, list[str]]:
    result = checkpoint.run(batch_parameters={"dataframe": df.reset_index(drop=True)})
    rejected: dict[Key, list[str]] = {}
    for run in result.run_results.values():
        for r in run.results:
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise RuntimeError(f"GX expectation {r.expectation_config.type} failed to run: "
                                   f"{r.exception_info.get('exception_message')}")
            if r.success:
                continue
            why = r.expectation_config.meta["reason"]
            for item in r.result["unexpected_index_list"]:
                rejected.setdefault((item["group_id"], item["domain"]), []).append(why)
    return rejected


def regenerable(rejected: dict[Key, list[str]]) -> list[Key]:
    """Rows to send back to the teacher: any failure except waiting for a sibling to pass."""
    return sorted(k for k, reasons in rejected.items() if set(reasons) - {INCOMPLETE})


def final_verdict(rows: list[dict[str, Any]], rejected: dict[Key, list[str]]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(accepted, rejected rows with `reason`) after the last attempt.

    GX already drops whole groups: when a training-domain row fails, its siblings fail the
    completeness gate. A failing held-out-domain row goes alone (it is only evaluation data).
    """
    accepted, rejects = [], []
    for row in rows:
        reasons = rejected.get((row["group_id"], row["domain"]))
        if reasons:
            rejects.append(reject_row(row, reasons, final=True))
        else:
            accepted.append(row)
    return accepted, rejects


def retried_rows(rows: list[dict[str, Any]], rejected: dict[Key, list[str]], keys: list[Key]) -> list[dict[str, Any]]:
    """The attempts that are about to be regenerated, as reject rows."""
    wanted = set(keys)
    return [reject_row(r, rejected[(r["group_id"], r["domain"])], final=False)
            for r in rows if (r["group_id"], r["domain"]) in wanted]


def reject_row(row: dict[str, Any], reasons: list[str], final: bool) -> dict[str, Any]:
    """A row of rejects.jsonl; `final` is False when the attempt was sent back for regeneration."""
    return row | {"reason": ", ".join(reasons), "final": final}


def reasons_of(reject: dict[str, Any]) -> list[str]:
    return reject["reason"].split(", ")

