"""Errors a user can fix. Each message names the file, line, key or field at fault."""


class IGAError(Exception):
    """Base class: the CLI prints the message and exits non-zero instead of a traceback."""


class ConfigError(IGAError):
    """An invalid or missing setting (params.yaml key, environment variable)."""


class DataError(IGAError):
    """Malformed input data (seed file, intermediate JSONL)."""


class TeacherError(IGAError):
    """One failed teacher attempt (HTTP error, bad JSON, schema mismatch).

    Never fatal: the attempt becomes a row with `error` set, which the gates reject.
    """


class TrainingError(IGAError):
    """A training run that cannot go on (a NaN or inf loss); the message names the step and checkpoint."""


class TeacherAbort(IGAError):
    """The teacher stage must stop: a non-retryable HTTP error (400, 401, 403, 404) or the budget.

    Every response received so far is in the response cache: a re-run pays only for the rest.
    """


class BudgetExceeded(TeacherAbort):
    """The next call could push the stage's spending past teacher.budget_usd."""


class HealthError(IGAError):
    """A data stage's output fell below its floor (every teacher call failed, too few groups kept, an
    empty side of the split): the stage fails instead of handing nothing to the next one."""


class Busy(IGAError):
    """Another run holds the lock this one needs (two lifecycle runs in one project at once)."""
