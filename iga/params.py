"""The one reader of params.yaml. Every stage gets a validated, frozen `Params`.

params.yaml is the single source of defaults: every key is required here, unknown keys are
errors (a typo must not silently fall back to a default), and each error names its key.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from iga.errors import ConfigError

PARAMS_FILE = Path("params.yaml")


# The names a params.yaml may use, defined here (the schema) and implemented by iga.data.program and
# iga.eval.external, which take their tuples from these; a typo fails at load.
Family = Literal["arithmetic", "implication", "comparison"]
Benchmark = Literal["gsm8k", "math_id", "math_ood"]
Style = Literal["plain", "terse", "verbose", "reordered", "restated"]  # how the procedural teacher writes a CoT
Budget = int | Literal["auto"]  # greedy decoding tokens; auto: the longest training CoT's (iga.eval.evaluate.token_budget)


@dataclass(frozen=True)
class SeedsParams:
    source: Literal["procedural", "jsonl", "gsm_symbolic"]
    n: int  # seeds to generate (procedural, gsm_symbolic); ignored for jsonl
    seed: int
    min_steps: int
    max_steps: int
    families: tuple[Family, ...]
    path: str | None  # the user's JSONL seed file (source: jsonl)


@dataclass(frozen=True)
class DomainsParams:
    train: tuple[str, ...]  # isomer domains used for training and ID evaluation
    ood: tuple[str, ...]  # held-out domains, test seeds only, OOD evaluation

    @property
    def all(self) -> tuple[str, ...]:
        return self.train + self.ood


@dataclass(frozen=True)
class OpenAIParams:
    model: str
    base_url: str | None  # None: the client's default (OPENAI_BASE_URL or api.openai.com)
    temperature: float
    max_tokens: int
    timeout_s: float
    max_retries: int  # retries per call of a 429, 5xx, timeout or connection error (backoff with jitter)
    backoff_s: float  # the first retry's backoff ceiling; doubles per retry (full jitter), Retry-After wins
    backoff_max_s: float
    breaker: int  # this many connection errors in a row, across calls, stop the stage (a dead endpoint)
    prompt_version: str


@dataclass(frozen=True)
class PriceParams:
    input: float  # USD per million prompt tokens
    output: float  # USD per million completion tokens


@dataclass(frozen=True)
class TeacherParams:
    provider: Literal["procedural", "openai"]
    seed: int
    flaw_rate: float  # procedural: mean probability that an attempt has a mistake
    shortcut_rate: float  # procedural: P(a yes/no question ends with its domain's hint)
    cue_reliability: dict[str, float]  # procedural: per training domain, P(its hint names the right answer)
    ood_cue: Literal["none", "reversed"]  # procedural: held-out domains carry no hint, or a hint at the wrong answer
    style: Style  # procedural: how each instance's CoT is written
    samples: int  # candidate CoTs per training instance for the select stage, the instance's own first
    chunk_size: int  # seeds (or regeneration requests) per Prefect task
    task_retries: int  # Prefect retries of a chunk that crashed
    mode: Literal["online", "batch"]  # openai: concurrent calls, or the Batch API (half price, hours)
    concurrency: int  # openai: calls in flight at once, shared by a stage's concurrent chunk tasks
    rpm: int | None  # openai: requests per minute (None: no limit)
    tpm: int | None  # openai: tokens per minute, counted as prompt estimate + max_tokens (None: no limit)
    budget_usd: float | None  # openai: the teacher stages stop before their new spending would exceed it
    cache_dir: str  # openai: every response received, one file per cache key; not a DVC output
    batch_poll_s: float  # openai, batch mode: seconds between polls of a batch job
    batch_discount: float  # price factor of the Batch API
    prices: dict[str, PriceParams]  # model -> USD per million tokens
    openai: OpenAIParams


@dataclass(frozen=True)
class GateParams:
    min_alignment: float
    max_step_diff: int
    max_attempts: int  # teacher attempts per instance (and per seed's DAG), the first included
    min_kept_fraction: float  # the gate stage fails below this share of groups kept


@dataclass(frozen=True)
class SplitParams:
    unit: Literal["seed", "instance"]  # instance: the paper's leakage ablation only
    test_fraction: float
    seed: int


Strategy = Literal["first", "rsr", "nll", "random"]  # which candidate CoT of each training instance is kept


@dataclass(frozen=True)
class SelectParams:
    strategy: Strategy  # which candidate CoT each training instance keeps
    seed: int  # strategy random
    batch_size: int  # sequences per scoring forward pass
    rank_clip: int  # RSR: a token's rank is clipped here (the paper: 100)


@dataclass(frozen=True)
class StudentParams:
    base: str  # smollm2 (embedded GGUF) | tiny (built from a config) | a local path | a hub id
    dtype: Literal["float32", "bfloat16"]  # of the frozen base weights


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float  # must be 0 for IGA: the per-domain gradient engine needs the base layer's input
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class TrainParams:
    methods: tuple[str, ...]  # keys of `methods`: one DVC `train` stage each
    seed: int
    steps: int  # optimizer steps
    groups_per_batch: int  # K isomer groups per micro-batch (K x N sequences)
    grad_accum: int  # micro-batches per optimizer step
    max_length: int  # tokens per sequence (prompt + CoT); a group with a longer member is dropped
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    warmup_frac: float  # linear warm-up fraction, then cosine decay to 0
    threads: int  # torch.set_num_threads
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "float32", "bfloat16"]  # bf16 autocast; auto: where the hardware has native bf16
    checkpoint_every: int  # steps
    nproc: int  # data-parallel ranks on this machine (torchrun); 1: one process
    collective_timeout_s: float  # a rank that waits longer than this for the others fails the run


@dataclass(frozen=True)
class ERMConfig:
    """Plain mean token loss over the batch (ERM-SFT)."""
    kind: Literal["erm"]


@dataclass(frozen=True)
class IGAConfig:
    """Invariant Gradient Alignment; the variants are explained in iga/core.py."""
    kind: Literal["iga"]
    tau: float
    reconstruction: Literal["factor", "exact", "none"]  # none: mask the LoRA factor gradients themselves
    mask_normalize: Literal["none", "relative"]
    projection: Literal["svd_factors", "chain_rule", "none"]
    mask: Literal["exp", "and"]  # exp: M = exp(-tau V); and: the binary AND-mask (signs unanimous), an ablation
    oversample: int  # randomized SVD oversampling
    passes: Literal["one", "per_domain"]  # per_domain: N forward+backward passes, the paper's way


@dataclass(frozen=True)
class PenaltyConfig:
    """IRM or V-REx as in DomainBed: mean per-domain loss + weight x penalty. The weight is 1 for the
    first anneal_frac of the steps (DomainBed: 500 of 5000 iterations), then penalty_weight, and the
    optimizer's moments are reset at the switch."""
    kind: Literal["irm", "vrex"]
    penalty_weight: float  # DomainBed: irm_lambda 1e2, vrex_lambda 1e1
    anneal_frac: float


@dataclass(frozen=True)
class PCGradConfig:
    """PCGrad: per-domain LoRA gradients with their conflicts projected away, summed."""
    kind: Literal["pcgrad"]


@dataclass(frozen=True)
class AndMaskConfig:
    """AND-mask: the mean LoRA gradient where the domains' signs agree (|mean sign| >= tau)."""
    kind: Literal["and_mask"]
    tau: float  # in [0, 1] (DomainBed 1: unanimous)


@dataclass(frozen=True)
class SandMaskConfig:
    """SAND-mask: the smooth AND-mask, DomainBed's formula."""
    kind: Literal["sand_mask"]
    tau: float  # in (0, 1): at DomainBed's default 1 the mask is all zero
    k: float  # steepness (DomainBed 10)


@dataclass(frozen=True)
class ParetoGSConfig:
    """Pareto-GS: the min-norm point of the convex hull of the per-domain LoRA gradients (MGDA)."""
    kind: Literal["pareto_gs"]


@dataclass(frozen=True)
class VCDConfig:
    """Validity-calibrated distillation (iga/train/vcd.py): the loss on each teacher line is weighted by
    w = clip(1 + beta (v_teacher - v_student), w_min, w_max), v the verified validity of the line and of
    the student's own greedy line under the same prefix."""
    kind: Literal["vcd"]
    beta: float  # 0: ERM exactly
    w_min: float
    w_max: float
    refresh: int  # steps a row's student proposals are reused before they are generated again (when its group recurs)
    max_line_tokens: int  # greedy decoding budget of one proposed line


GradientRuleConfig = PCGradConfig | AndMaskConfig | SandMaskConfig | ParetoGSConfig
MethodConfig = (ERMConfig | IGAConfig | PenaltyConfig | PCGradConfig | AndMaskConfig | SandMaskConfig | ParetoGSConfig
                | VCDConfig)


@dataclass(frozen=True)
class RunConfig:
    """One row of the experiment: a method of `methods` trained on a variant of the data."""
    method: str  # a key of `methods`
    data: Literal["isomers", "random_pairing", "shuffled", "seed_only", "no_hints"]
    domains: tuple[str, ...] | None  # a subset of domains.train (None: all of them)
    split: Literal["seed", "instance"]
    select: Strategy  # which candidate CoT of each training instance it learns from
    # (select.strategy's choices; first: the instance's own, the split's rows)


@dataclass(frozen=True)
class RayResources:
    num_cpus: int  # reserved per (run, draw, seed); the task sets torch's threads to it
    num_gpus: float  # reserved per (run, draw, seed); a fraction shares a GPU


@dataclass(frozen=True)
class RayParams:
    address: str | None  # None: start a local Ray instance; "auto", "host:port" or "ray://host:port": join a cluster
    resources: RayResources


@dataclass(frozen=True)
class HparamRange:
    """Where a random draw of one hyperparameter comes from (iga/experiment/sweep.py)."""
    lo: float
    hi: float
    scale: Literal["log", "linear"]  # log: log-uniform on [lo, hi] (DomainBed's 10**uniform); linear: uniform


@dataclass(frozen=True)
class ExperimentParams:
    seeds: tuple[int, ...]  # train.seed of each repeat (LoRA init, batch order); the data split stays fixed
    table2_seeds: tuple[int, ...]  # the seeds of `seeds` Table 2's ablations run with
    steps: int  # optimizer steps per run
    eval_groups: int  # held-out test seeds whose ID and OOD problems each run generates (NLL, LCS: every test seed)
    max_new_tokens: Budget  # greedy decoding budget per completion
    cost_steps: int  # table 3: timed rounds, each method and ERM one step a round on its new batch, after warm-up
    runner: Literal["local", "ray"]  # local: one (run, draw, seed) after another in the flow's process; ray: Ray tasks
    ray: RayParams
    hparam_draws: int  # per Table 1 run: draw 0 = the configured hyperparameters, 1.. random from `ranges`
    val_seeds: int  # training seeds held out of every run's training: the model-selection (validation) set
    ranges: dict[str, dict[str, HparamRange]]  # train (lr) or a method kind -> its swept fields -> their ranges
    table1: tuple[str, ...]  # keys of runs: the methods table
    table2: tuple[str, ...]  # keys of runs: the ablations, each against full IGA
    oracle: str | None  # key of the run (data no_hints) Table 1 measures the gap closed against; null: none
    runs: dict[str, RunConfig]


@dataclass(frozen=True)
class TeacherVariant:
    """A named procedural teacher for flows.rank_teachers: `teacher` with these two keys changed."""
    style: Style
    flaw_rate: float


@dataclass(frozen=True)
class RankTeachersParams:
    teachers: dict[str, TeacherVariant]
    groups: int  # training isomer groups each teacher writes, scored and (correlation experiment) trained on
    seeds: tuple[int, ...]  # correlation experiment: train.seed of the ERM runs on each teacher's data
    steps: int  # correlation experiment: optimizer steps per run
    eval_groups: int  # correlation experiment: held-out test seeds (x 4 ID + x 2 OOD problems) each student answers


@dataclass(frozen=True)
class ExternalParams:
    limit: int  # problems: a seeded subset of the benchmark; 0 skips it


@dataclass(frozen=True)
class EvalParams:
    dtype: Literal["auto", "float32", "bfloat16"]  # of the merged student; auto: bf16 where native (iga/hardware.py)
    max_new_tokens: Budget  # greedy decoding budget per completion (paper: 512)
    batch_size: int  # sequences decoded together
    nll_batch_size: int  # sequences per teacher-forced forward pass (NLL, LCS)
    lcs_groups: int  # held-out isomer groups for the Logical Consistency Score (paper: 500)
    threads: int  # torch.set_num_threads
    external: dict[Benchmark, ExternalParams]


@dataclass(frozen=True)
class RegistryParams:
    model_name: str  # the MLflow registered model every trained adapter becomes a version of
    primary_metric: Literal["ood_accuracy", "ood_nll"]  # what promotion compares, problem by problem
    alpha: float  # level of the one-sided paired test a challenger must pass (Holm-corrected across challengers)
    min_delta: float  # the smallest improvement worth a promotion, in the metric's units (fraction; nats/token)
    baseline: str  # with no champion yet, this method's version is the incumbent the others must beat


@dataclass(frozen=True)
class ScheduleParams:
    cron: str  # the Prefect deployment's schedule (five fields)
    timezone: str


@dataclass(frozen=True)
class Params:
    seeds: SeedsParams
    domains: DomainsParams
    teacher: TeacherParams
    gate: GateParams
    split: SplitParams
    select: SelectParams
    student: StudentParams
    lora: LoraParams
    train: TrainParams
    methods: dict[str, MethodConfig]  # named configurations, e.g. iga and iga-paper
    eval: EvalParams
    experiment: ExperimentParams
    rank_teachers: RankTeachersParams
    registry: RegistryParams
    schedule: ScheduleParams

    def method(self, name: str) -> MethodConfig:
        """The named method configuration; an unknown name is a clear error, not a KeyError."""
        if name not in self.methods:
            raise ConfigError(f"params: no method {name!r} under methods (known: {sorted(self.methods)})")
        return self.methods[name]


def _convert(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"params: {key} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"params: {key} must be a non-empty mapping, got {value!r}")
        (key_tp, inner) = typing.get_args(tp)
        if typing.get_origin(key_tp) is Literal:
            for k in value:
                _convert(key_tp, k, f"{key}.{k}")
        return {str(k): _convert(inner, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        configs = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(configs) > 1:  # a tagged union: `kind` picks the dataclass
            kinds = {k: c for c in configs for k in typing.get_args(typing.get_type_hints(c)["kind"])}
            kind = value.get("kind") if isinstance(value, dict) else None
            if kind not in kinds:
                raise ConfigError(f"params: {key}.kind must be one of {sorted(kinds)}, got {kind!r}")
            return _build(kinds[kind], value, key)
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        for member in members:  # e.g. int | Literal["auto"]: the first that takes the value
            try:
                return _convert(member, value, key)
            except ConfigError:
                if len(members) == 1:
                    raise
        names = " or ".join(", ".join(map(repr, typing.get_args(m))) if typing.get_origin(m) is Literal else m.__name__
                            for m in members)
        raise ConfigError(f"params: {key} must be {names}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"params: {key} must be a non-empty list, got {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"params: {key} must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"params: {prefix or 'the file'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    dot = f"{prefix}." if prefix else ""
    for k in data:
        if k not in names:
            raise ConfigError(f"params: unknown key {dot}{k} (expected one of {names})")
    for k in names:
        if k not in data:
            raise ConfigError(f"params: missing key {dot}{k}")
    return cls(**{k: _convert(hints[k], data[k], f"{dot}{k}") for k in names})


def _check(ok: bool, key: str, msg: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"params: {key} {msg}, got {value!r}")


def _validate(p: Params) -> None:
    s, t, g, sp = p.seeds, p.teacher, p.gate, p.split
    _check(s.n >= 1, "seeds.n", "must be >= 1", s.n)
    _check(2 <= s.min_steps <= s.max_steps <= 6, "seeds.min_steps/max_steps", "must satisfy 2 <= min <= max <= 6",
           (s.min_steps, s.max_steps))
    _check(s.source != "jsonl" or bool(s.path), "seeds.path", "is required when seeds.source is jsonl", s.path)
    _check(s.source == "procedural" or t.provider != "procedural", "teacher.provider",
           f"procedural can only instantiate procedural seeds (they carry a program); seeds.source {s.source!r} "
           "needs teacher.provider: openai", t.provider)
    overlap = set(p.domains.train) & set(p.domains.ood)
    _check(not overlap, "domains.ood", "must not share domains with domains.train", sorted(overlap))
    _check(len(set(p.domains.all)) == len(p.domains.all), "domains", "must not list a domain twice", p.domains.all)
    _check(0.0 <= t.flaw_rate < 1.0, "teacher.flaw_rate", "must be in [0, 1)", t.flaw_rate)
    _check(0.0 <= t.shortcut_rate <= 1.0, "teacher.shortcut_rate", "must be in [0, 1]", t.shortcut_rate)
    _check(set(t.cue_reliability) == set(p.domains.train), "teacher.cue_reliability",
           f"must name each training domain once ({', '.join(p.domains.train)})", sorted(t.cue_reliability))
    for domain, r in t.cue_reliability.items():
        _check(0.0 <= r <= 1.0, f"teacher.cue_reliability.{domain}", "must be in [0, 1]", r)
    _check(t.samples >= 1, "teacher.samples", "must be >= 1", t.samples)
    _check(t.chunk_size >= 1, "teacher.chunk_size", "must be >= 1", t.chunk_size)
    _check(t.task_retries >= 0, "teacher.task_retries", "must be >= 0", t.task_retries)
    _check(0.0 <= t.openai.temperature <= 2.0, "teacher.openai.temperature", "must be in [0, 2]", t.openai.temperature)
    _check(t.openai.max_tokens >= 1, "teacher.openai.max_tokens", "must be >= 1", t.openai.max_tokens)
    _check(t.openai.timeout_s > 0, "teacher.openai.timeout_s", "must be > 0", t.openai.timeout_s)
    _check(t.openai.max_retries >= 0, "teacher.openai.max_retries", "must be >= 0", t.openai.max_retries)
    _check(0 <= t.openai.backoff_s <= t.openai.backoff_max_s, "teacher.openai.backoff_s",
           "must be in [0, backoff_max_s]", t.openai.backoff_s)
    _check(t.openai.breaker >= 1, "teacher.openai.breaker", "must be >= 1", t.openai.breaker)
    _check(t.concurrency >= 1, "teacher.concurrency", "must be >= 1", t.concurrency)
    for key in ("rpm", "tpm", "budget_usd"):
        _check(getattr(t, key) is None or getattr(t, key) > 0, f"teacher.{key}", "must be > 0 or null",
               getattr(t, key))
    _check(t.batch_poll_s > 0, "teacher.batch_poll_s", "must be > 0", t.batch_poll_s)
    _check(0 < t.batch_discount <= 1, "teacher.batch_discount", "must be in (0, 1]", t.batch_discount)
    for model, price in t.prices.items():
        _check(price.input >= 0 and price.output >= 0, f"teacher.prices.{model}", "must be >= 0",
               (price.input, price.output))
    if t.provider == "openai" and t.budget_usd is not None:
        _check(t.openai.model in t.prices, "teacher.budget_usd", f"needs a price for teacher.openai.model "
               f"{t.openai.model!r} under teacher.prices", t.budget_usd)
    _check(0.0 <= g.min_alignment <= 1.0, "gate.min_alignment", "must be in [0, 1]", g.min_alignment)
    _check(g.max_step_diff >= 0, "gate.max_step_diff", "must be >= 0", g.max_step_diff)
    _check(g.max_attempts >= 1, "gate.max_attempts", "must be >= 1", g.max_attempts)
    _check(0.0 <= g.min_kept_fraction <= 1.0, "gate.min_kept_fraction", "must be in [0, 1]", g.min_kept_fraction)
    _check(0.0 < sp.test_fraction < 1.0, "split.test_fraction", "must be in (0, 1)", sp.test_fraction)
    _check(p.select.batch_size >= 1, "select.batch_size", "must be >= 1", p.select.batch_size)
    _check(p.select.rank_clip >= 1, "select.rank_clip", "must be >= 1", p.select.rank_clip)
    _check(p.select.strategy == "first" or t.samples > 1, "select.strategy", "needs teacher.samples > 1 (with one "
           "candidate per instance every strategy keeps it)", p.select.strategy)
    lo, tr = p.lora, p.train
    _check(lo.r >= 1, "lora.r", "must be >= 1", lo.r)
    _check(lo.alpha > 0, "lora.alpha", "must be > 0", lo.alpha)
    _check(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)", lo.dropout)
    for name in p.methods:
        _check_name(f"methods.{name}", name)
    for i, name in enumerate(tr.methods):
        _check(name in p.methods, f"train.methods[{i}]", f"must be a key of methods ({sorted(p.methods)})", name)
    for name, cfg in p.methods.items():
        if isinstance(cfg, IGAConfig):
            _check(lo.dropout == 0, "lora.dropout", f"must be 0 for method {name} (IGA's per-domain gradients "
                   "need the LoRA branch to see the base layer's input)", lo.dropout)
        if isinstance(cfg, GradientRuleConfig):
            _check(lo.dropout == 0, "lora.dropout", f"must be 0 for method {name} (per-domain gradients)", lo.dropout)
        _check_method(f"methods.{name}", cfg)
    for key in ("steps", "groups_per_batch", "grad_accum", "max_length", "threads", "checkpoint_every", "nproc"):
        _check(getattr(tr, key) >= 1, f"train.{key}", "must be >= 1", getattr(tr, key))
    _check(tr.groups_per_batch % tr.nproc == 0, "train.groups_per_batch", f"must divide evenly among the "
           f"train.nproc = {tr.nproc} ranks (it is the global batch)", tr.groups_per_batch)
    _check(tr.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0", tr.collective_timeout_s)
    _check(tr.lr > 0, "train.lr", "must be > 0", tr.lr)
    _check(tr.weight_decay >= 0, "train.weight_decay", "must be >= 0", tr.weight_decay)
    _check(0 <= tr.beta1 < 1 and 0 <= tr.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)", (tr.beta1, tr.beta2))
    _check(0.0 <= tr.warmup_frac < 1.0, "train.warmup_frac", "must be in [0, 1)", tr.warmup_frac)
    ev = p.eval
    for key in ("batch_size", "nll_batch_size", "lcs_groups", "threads"):
        _check(getattr(ev, key) >= 1, f"eval.{key}", "must be >= 1", getattr(ev, key))
    _check(ev.max_new_tokens == "auto" or ev.max_new_tokens >= 1, "eval.max_new_tokens", "must be auto or >= 1",
           ev.max_new_tokens)
    for name, ext in ev.external.items():
        _check(ext.limit >= 0, f"eval.external.{name}.limit", "must be >= 0", ext.limit)
    _validate_experiment(p)
    rt = p.rank_teachers
    for name, v in rt.teachers.items():
        _check(0.0 <= v.flaw_rate < 1.0, f"rank_teachers.teachers.{name}.flaw_rate", "must be in [0, 1)", v.flaw_rate)
    for key in ("groups", "steps", "eval_groups"):
        _check(getattr(rt, key) >= 1, f"rank_teachers.{key}", "must be >= 1", getattr(rt, key))
    rg = p.registry
    _check(bool(rg.model_name.strip()), "registry.model_name", "must not be empty", rg.model_name)
    _check(0 < rg.alpha < 1, "registry.alpha", "must be in (0, 1)", rg.alpha)
    _check(rg.min_delta >= 0, "registry.min_delta", "must be >= 0", rg.min_delta)
    _check(rg.baseline in p.methods, "registry.baseline", f"must be a key of methods ({sorted(p.methods)})", rg.baseline)
    _check(len(p.schedule.cron.split()) == 5, "schedule.cron", "must have five fields (min hour day month weekday)",
           p.schedule.cron)


def _check_method(key: str, cfg: MethodConfig) -> None:
    """A method configuration's own values; `key` names it (methods.<name>, or a sweep range's bound applied to it)."""
    if isinstance(cfg, IGAConfig):
        _check(cfg.tau >= 0, f"{key}.tau", "must be >= 0", cfg.tau)
        _check(cfg.oversample >= 0, f"{key}.oversample", "must be >= 0", cfg.oversample)
        _check(cfg.reconstruction != "none" or cfg.projection == "none", f"{key}.projection",
               "must be none when reconstruction is none (there is no full-weight gradient to project)",
               cfg.projection)
    if isinstance(cfg, PenaltyConfig):
        _check(cfg.penalty_weight >= 0, f"{key}.penalty_weight", "must be >= 0", cfg.penalty_weight)
        _check(0 <= cfg.anneal_frac < 1, f"{key}.anneal_frac", "must be in [0, 1)", cfg.anneal_frac)
    if isinstance(cfg, AndMaskConfig):
        _check(0 <= cfg.tau <= 1, f"{key}.tau", "must be in [0, 1]", cfg.tau)
    if isinstance(cfg, SandMaskConfig):
        _check(0 < cfg.tau < 1, f"{key}.tau", "must be in (0, 1) (at 1 the SAND-mask is all zero)", cfg.tau)
        _check(cfg.k > 0, f"{key}.k", "must be > 0", cfg.k)
    if isinstance(cfg, VCDConfig):
        _check(0 <= cfg.w_min <= 1 <= cfg.w_max, f"{key}.w_min/w_max", "must satisfy 0 <= w_min <= 1 <= "
               "w_max (w = 1 where the teacher and the student are both valid)", (cfg.w_min, cfg.w_max))
        _check(cfg.beta >= 0, f"{key}.beta", "must be >= 0", cfg.beta)
        for field in ("refresh", "max_line_tokens"):
            _check(getattr(cfg, field) >= 1, f"{key}.{field}", "must be >= 1", getattr(cfg, field))


def _validate_experiment(p: Params) -> None:
    ex = p.experiment
    for key in ("steps", "eval_groups", "cost_steps", "hparam_draws", "val_seeds"):
        _check(getattr(ex, key) >= 1, f"experiment.{key}", "must be >= 1", getattr(ex, key))
    _check(ex.max_new_tokens == "auto" or ex.max_new_tokens >= 1, "experiment.max_new_tokens", "must be auto or >= 1",
           ex.max_new_tokens)
    address = ex.ray.address
    _check(address is None or address == "auto" or re.fullmatch(r"(ray://)?[\w.-]+:\d+", address) is not None,
           "experiment.ray.address", "must be null (a local Ray instance), auto, host:port or ray://host:port", address)
    res = ex.ray.resources
    _check(res.num_cpus >= 1, "experiment.ray.resources.num_cpus", "must be >= 1", res.num_cpus)
    _check(res.num_gpus >= 0, "experiment.ray.resources.num_gpus", "must be >= 0", res.num_gpus)
    _check(len(set(ex.seeds)) == len(ex.seeds), "experiment.seeds", "must not repeat a seed", ex.seeds)
    _check(len(set(ex.table2_seeds)) == len(ex.table2_seeds) and set(ex.table2_seeds) <= set(ex.seeds),
           "experiment.table2_seeds",
           f"must be some of experiment.seeds {list(ex.seeds)}, each once", ex.table2_seeds)
    rows = p.train.groups_per_batch * len(p.domains.train)  # sequences per micro-batch, the same for every run
    for name, run in ex.runs.items():
        key = f"experiment.runs.{name}"
        _check_name(key, name)
        _check(run.method in p.methods, f"{key}.method", f"must be a key of methods ({sorted(p.methods)})", run.method)
        domains = run.domains or p.domains.train
        unknown = sorted(set(domains) - set(p.domains.train))
        _check(not unknown, f"{key}.domains", f"must be a subset of domains.train {list(p.domains.train)}", unknown)
        _check(run.data != "seed_only" or len(domains) == 1, f"{key}.domains", "must name one domain for data "
               "seed_only", domains)
        _check(run.select == "first" or run.split == p.split.unit, f"{key}.select", f"needs split {p.split.unit} "
               "(the split stage's unit: selection chooses among its training rows' candidates)", run.select)
        _check(run.select == "first" or p.teacher.samples > 1, f"{key}.select", "needs teacher.samples > 1 (with one "
               "candidate per instance every strategy keeps it)", run.select)
        per_unit = len(domains) if run.data in ("isomers", "random_pairing", "no_hints") else 1
        _check(rows % per_unit == 0, f"{key}.domains", f"must divide the {rows} sequences of a micro-batch "
               "(train.groups_per_batch x len(domains.train))", domains)
    for table in ("table1", "table2"):
        for i, name in enumerate(getattr(ex, table)):
            _check(name in ex.runs, f"experiment.{table}[{i}]", "must be a key of experiment.runs", name)
    _check("iga" in ex.table1, "experiment.table1", "must include iga (both tables compare with it)", ex.table1)
    if ex.oracle is not None:
        _check(ex.oracle in ex.runs and ex.runs[ex.oracle].data == "no_hints", "experiment.oracle",
               "must be a key of experiment.runs whose data is no_hints (the problems without their hints)", ex.oracle)
        _check(ex.oracle not in ex.table1 + ex.table2, "experiment.oracle", "must not be a row of table1 or table2 "
               "(a reference, not a competitor: Table 1 shows it apart)", ex.oracle)
        _check("erm" in ex.table1, "experiment.table1", "must include erm when experiment.oracle is set (the gap "
               "closed runs from erm to the oracle)", ex.table1)
    _validate_ranges(p)


def _validate_ranges(p: Params) -> None:
    """Each section is `train` (its `lr`) or a method kind (its float fields), each range with both bounds valid
    values there: every draw lies between them, and each method check is an interval. With more than one draw,
    `train` is there: every pair of the sweep reads it (DVC param experiment.ranges.train)."""
    ex = p.experiment
    kinds = {k: c for c in typing.get_args(MethodConfig) for k in typing.get_args(typing.get_type_hints(c)["kind"])}
    for section, fields in ex.ranges.items():
        _check(section == "train" or section in kinds, f"experiment.ranges.{section}", f"must be train or a method "
               f"kind ({sorted(kinds)})", section)
        for name, r in fields.items():
            key = f"experiment.ranges.{section}.{name}"
            _check(r.lo < r.hi, key, "must have lo < hi", (r.lo, r.hi))
            _check(r.scale == "linear" or r.lo > 0, f"{key}.lo", "must be > 0 on a log scale", r.lo)
            if section == "train":
                _check(name == "lr", key, "must be lr (train.lr, the one training setting swept)", name)
                _check(r.lo > 0, f"{key}.lo", "must be > 0 (train.lr)", r.lo)
                continue
            _check(typing.get_type_hints(kinds[section]).get(name) is float, key,
                   f"must be a float field of kind {section}", name)
            for method, cfg in p.methods.items():
                if cfg.kind == section:
                    for end in ("lo", "hi"):
                        _check_method(f"{key}.{end} applied to methods.{method}",
                                      dataclasses.replace(cfg, **{name: getattr(r, end)}))
    _check(ex.hparam_draws == 1 or "train" in ex.ranges, "experiment.ranges", f"needs a train section (lr) for "
           f"hparam_draws {ex.hparam_draws}: every random draw takes train.lr from it", sorted(ex.ranges))


def _check_name(key: str, name: str) -> None:
    """Run and method names are DVC param keys (experiment.runs.<run>, methods.<method>), stage names and folders."""
    _check(re.fullmatch(r"[\w-]+", name) is not None, key, "must be named with letters, digits, _ and - only (DVC "
           "reads a dot as nesting: write iga-tau-0p1, not iga-tau-0.1)", name)


def parse_params(data: Any) -> Params:
    params = _build(Params, data, "")
    _validate(params)
    return params


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; `overrides` maps dotted keys ("gate.min_alignment") to values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for k in parents:
            node = node[k]
        if last not in node:
            raise ConfigError(f"params: override of unknown key {dotted}")
        node[last] = value
    try:
        return parse_params(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def require_teacher_credentials(params: Params) -> None:
    """Fail before any work when the openai teacher has no key (local servers accept any value)."""
    if params.teacher.provider == "openai" and not os.environ.get("OPENAI_API_KEY"):
        raise ConfigError("teacher.provider is openai but OPENAI_API_KEY is not set "
                          "(for a local vLLM/Ollama endpoint any non-empty value works)")
