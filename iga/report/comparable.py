"""One table, one numeric setting. `auto` precision resolves per machine (bf16 where the CPU or GPU has it, fp32
elsewhere), and greedy outputs differ between the two in some rows: results computed under different train
precisions or evaluation dtypes are refused in one table rather than compared as if they were alike."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

from iga.errors import DataError

SETTINGS = ("train_precision", "eval_dtype")  # as each run resolved them, recorded with its results


def check_comparable(ran: Mapping[str, Mapping[str, Any]], where: str, keys: Sequence[str] = SETTINGS) -> None:
    """`ran`: run name -> what it ran with. A DataError naming the runs when a key takes more than one value."""
    for key in keys:
        runs: dict[Any, list[str]] = defaultdict(list)
        for name, settings in ran.items():
            runs[settings.get(key)].append(name)
        if len(runs) > 1:
            groups = sorted(runs.items(), key=lambda kv: len(kv[1]))  # the odd ones first
            raise DataError(f"{where}: runs of different {key} cannot share a table: "
                            + "; ".join(f"{value}: {_few(names)}" for value, names in groups)
                            + " — rerun the odd ones on a machine like the others' (`dvc repro -f <stage>`), or set "
                            "train.precision and eval.dtype explicitly instead of auto (the default)")


def _few(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
