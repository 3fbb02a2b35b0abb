"""Training methods behind one interface (as DomainBed's algorithms.py), and their registry.

`Method.step(batch)` runs forward and backward on one micro-batch, ADDS the gradients of the
trainable (LoRA) parameters into their `.grad` (so the trainer can accumulate micro-batches), and
returns scalar metrics. The trainer owns the optimizer. Under data parallelism (iga/train/distributed.py)
the batch is this rank's share, the losses and metrics are the global ones, and `.grad` gets this
rank's share of the global gradient.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iga import combine
from iga.core import conflict_mask, lora_factor_grads, normalized_variance, project_to_lora, reconstruct
from iga.errors import ConfigError
from iga.params import AndMaskConfig, IGAConfig, MethodConfig, PenaltyConfig, SandMaskConfig, VCDConfig
from iga.train.distributed import World
from iga.train.forced import completion_logits, completion_nll
from iga.train.pergrad import LoraLayer, at_least_fp32, lora_layers, per_domain_gradients
from iga.train.sft import IGNORE, Batch
from iga.train.vcd import line_weight, propose_lines, token_lines


def token_losses(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-row sum of next-token losses over labelled tokens, and their count."""
    sums, counts, _ = forward_losses(model, batch)
    return sums, counts


def forward_losses(model: nn.Module, batch: Batch, hidden_states: bool = False, weights: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, tuple[Tensor, ...] | None]:
    """`token_losses` (weighted by `weights`, see `completion_nll`), and every layer's hidden states when asked."""
    c = completion_logits(model, batch, hidden_states)
    return completion_nll(c, weights), c.counts, c.hidden


def domain_means(sums: Tensor, counts: Tensor, n_domains: int, world: World = World()) -> Tensor:
    """Each domain's mean token loss (N,) over all ranks' rows, from a domain-major batch."""
    return world.sum(sums.view(n_domains, -1).sum(dim=1)) / world.sum(counts.view(n_domains, -1).sum(dim=1)).clamp(min=1)


def token_mean(sums: Tensor, counts: Tensor, world: World) -> Tensor:
    """The mean token loss over all ranks' rows."""
    return world.sum(sums.sum()) / world.sum(counts.sum()).clamp(min=1)


class Method:
    def __init__(self, model: nn.Module, config: MethodConfig, domains: tuple[str, ...], world: World = World()):
        self.model, self.config, self.domains, self.world = model, config, domains, world

    def begin_step(self, step: int, total: int) -> bool:
        """Called before each optimizer step; True asks the trainer to reset the optimizer's moments."""
        return False

    def step(self, batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    def _domain_metrics(self, per_domain: Tensor) -> dict[str, float]:
        return {f"loss/{d}": float(v) for d, v in zip(self.domains, per_domain.detach())}


class ERM(Method):
    """ERM-SFT: the plain mean token loss over the whole batch, no group structure."""

    def step(self, batch: Batch) -> dict[str, float]:
        sums, counts = token_losses(self.model, batch)
        loss = token_mean(sums, counts, self.world)
        loss.backward()
        return {"loss": loss.item(), **self._domain_metrics(domain_means(sums, counts, batch.n_domains, self.world))}


class Penalty(Method):
    """IRM and V-REx (DomainBed): the mean per-domain loss plus weight x an invariance penalty."""
    config: PenaltyConfig

    def __init__(self, model: nn.Module, config: PenaltyConfig, domains: tuple[str, ...], world: World = World()):
        super().__init__(model, config, domains, world)
        self.weight = 1.0

    def begin_step(self, step: int, total: int) -> bool:
        switch = round(self.config.anneal_frac * total)
        self.weight = self.config.penalty_weight if step >= switch else 1.0
        return step == switch > 0  # Adam's moments do not fit the sharp jump in gradient scale

    def step(self, batch: Batch) -> dict[str, float]:
        n = batch.n_domains
        if self.config.kind == "vrex":
            per_domain = domain_means(*token_losses(self.model, batch), n, self.world)
            penalty = combine.vrex_penalty(per_domain)
        else:
            per_domain, penalty = self._irm(batch)
        loss = per_domain.mean() + self.weight * penalty
        loss.backward()
        return {"loss": per_domain.mean().item(), "penalty": penalty.item(), "penalty_weight": self.weight,
                **self._domain_metrics(per_domain)}

    def _irm(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Each domain's logits times its own dummy scale (1); the penalty's unbiased estimate pairs the
        losses on the even and the odd labelled positions of that domain's rows."""
        n = batch.n_domains
        logits = at_least_fp32(self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1])
        labels = batch.labels[:, 1:]
        scale = torch.ones(n, dtype=logits.dtype, device=logits.device, requires_grad=True)  # its gradients too
        rows = logits.shape[0] // n
        scaled = logits * scale.repeat_interleave(rows)[:, None, None]
        loss = F.cross_entropy(scaled.reshape(-1, scaled.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="none").view(labels.shape)
        labelled = labels != IGNORE
        even = labelled & (torch.arange(labels.shape[1], device=labels.device) % 2 == 0)
        halves = [domain_means((loss * part).sum(dim=1), part.sum(dim=1), n, self.world)
                  for part in (even, labelled & ~even)]
        per_domain = domain_means(loss.sum(dim=1), labelled.sum(dim=1), n, self.world)
        return per_domain, combine.irm_penalty(*halves, scale, total=self.world.sum)


def _stash_lora_grads(layers: list[LoraLayer]) -> dict[nn.Parameter, Tensor | None]:
    """Take the LoRA .grad that earlier micro-batches accumulated out of autograd's way."""
    stash = {}
    for layer in layers:
        for param in (layer.A, layer.B):
            stash[param], param.grad = param.grad, None
    return stash


def _add_lora_grads(new: dict[nn.Parameter, Tensor], stash: dict[nn.Parameter, Tensor | None]) -> None:
    """The method's own LoRA gradients replace autograd's, added to what was accumulated before. A
    parameter missing from `new` (a module another rank owns) keeps only what was accumulated."""
    for param, before in stash.items():
        grad = new.get(param)
        if grad is None:
            param.grad = before
        else:
            param.grad = grad.to(param.dtype) if before is None else before + grad.to(param.dtype)


class GradientRule(Method):
    """PCGrad, AND-mask, SAND-mask and Pareto-GS: each domain's gradient of the LoRA parameters from
    the one-pass per-domain engine (chain rule from the full-weight G_n), combined by iga/combine.py.
    The masks act per LoRA tensor (as DomainBed's per parameter); PCGrad and MGDA see all of them
    flattened into one vector. Data-parallel: each module's per-domain LoRA gradients (LoRA-sized, N of
    them) are summed onto the rank that owns it, round-robin for the masks; PCGrad and MGDA need every
    module at once, so rank 0 owns all (their rule is LoRA-sized, cheap beside the forward and backward)."""

    def __init__(self, model: nn.Module, config: MethodConfig, domains: tuple[str, ...], world: World = World()):
        super().__init__(model, config, domains, world)
        self.layers = lora_layers(model)
        per_tensor = isinstance(config, (AndMaskConfig, SandMaskConfig))
        self.owners = {layer.name: world.owner(i) if per_tensor else 0 for i, layer in enumerate(self.layers)}

    def _combine(self, per_domain: dict[nn.Parameter, Tensor], seed: int) -> dict[nn.Parameter, Tensor]:
        c = self.config
        if isinstance(c, AndMaskConfig):
            return {p: combine.and_mask(g.flatten(1), c.tau).view(p.shape) for p, g in per_domain.items()}
        if isinstance(c, SandMaskConfig):
            return {p: combine.sand_mask(g.flatten(1), c.tau, c.k).view(p.shape) for p, g in per_domain.items()}
        flat = torch.cat([g.flatten(1) for g in per_domain.values()], dim=1)  # (N, P)
        update = combine.pcgrad(flat, torch.Generator().manual_seed(seed)) if c.kind == "pcgrad" else combine.mgda(flat)
        sizes = [p.numel() for p in per_domain]
        return {p: u.view(p.shape) for p, u in zip(per_domain, update.split(sizes), strict=True)}

    def step(self, batch: Batch) -> dict[str, float]:
        n = batch.n_domains
        stash = _stash_lora_grads(self.layers)
        per_domain: dict[nn.Parameter, Tensor] = {}

        def collect(layer: LoraLayer, G: Tensor) -> None:
            A, B = at_least_fp32(layer.A.detach()), at_least_fp32(layer.B.detach())
            owner = self.owners[layer.name]
            for param, grads in zip((layer.A, layer.B), lora_factor_grads(G, None, A, B, layer.scaling, "none")):
                total = self.world.reduce_to(grads, owner)  # linear in G: the ranks' shares add up
                if total is not None:
                    per_domain[param] = total

        with per_domain_gradients(self.layers, n, collect):
            losses = domain_means(*token_losses(self.model, batch), n, self.world)
            losses.mean().backward()
        with torch.autocast(batch.input_ids.device.type, enabled=False):
            _add_lora_grads(self._combine(per_domain, batch.seed) if per_domain else {}, stash)
        return {"loss": losses.mean().item(), **self._domain_metrics(losses)}


@dataclass
class _MaskStats:
    """Element-weighted over all LoRA modules: is the mask inert (≈1), killing (≈0) or discriminating?"""
    elements: int = 0
    mask_sum: float = 0.0
    below_half: int = 0
    vhat_sum: float = 0.0
    residuals: list[float] = field(default_factory=list)

    def add(self, mask: Tensor, vhat: Tensor) -> None:
        self.elements += mask.numel()
        self.mask_sum += float(mask.sum())
        self.below_half += int((mask < 0.5).sum())
        self.vhat_sum += float(vhat.sum())

    def reduce(self, world: World) -> None:
        """Every rank's statistics summed: each saw only the modules it owns."""
        if world.size == 1:
            return
        t = world.sum(torch.tensor([self.elements, self.mask_sum, self.below_half, self.vhat_sum,
                                    sum(self.residuals), len(self.residuals)], dtype=torch.float64))
        self.elements, self.below_half = int(t[0]), int(t[2])
        self.mask_sum, self.vhat_sum = float(t[1]), float(t[3])
        self.residuals = [float(t[4] / t[5])] if t[5] else []

    def metrics(self) -> dict[str, float]:
        out = {"mask_mean": self.mask_sum / self.elements, "mask_frac_below_half": self.below_half / self.elements,
               "vhat_mean": self.vhat_sum / self.elements}
        if self.residuals:
            out["proj_residual"] = sum(self.residuals) / len(self.residuals)
        return out


class IGA(Method):
    """Invariant Gradient Alignment (paper Algorithm 1), module by module:
    per-domain gradients → reconstruction → conflict mask → masked mean → rank-r projection.
    Data-parallel, sharded by module: each module's full-weight per-domain gradients (N × out × in) are
    summed onto the one rank that owns it (round-robin), which alone runs the mask and the SVD; the
    LoRA-sized results reach every rank through the trainer's all-reduce. IGA's extra compute and memory
    per rank shrink with the number of ranks instead of repeating on each."""
    config: IGAConfig

    def __init__(self, model: nn.Module, config: IGAConfig, domains: tuple[str, ...], world: World = World()):
        super().__init__(model, config, domains, world)
        self.layers = lora_layers(model)
        self.index = {layer.name: i for i, layer in enumerate(self.layers)}

    def _combine(self, layer: LoraLayer, G: Tensor, seed: int, stats: _MaskStats) -> tuple[Tensor, ...]:
        c = self.config
        # One generator per (micro-batch, module): the draws do not depend on the order modules arrive in.
        generator = torch.Generator(device=G.device).manual_seed(seed * 100_003 + self.index[layer.name])
        A, B, s = at_least_fp32(layer.A.detach()), at_least_fp32(layer.B.detach()), layer.scaling
        with torch.autocast(G.device.type, enabled=False):  # the IGA math runs in fp32 under bf16 autocast
            if c.reconstruction == "none":  # ablation: mask each LoRA factor's per-domain gradients directly
                factors = lora_factor_grads(G, None, A, B, s, "none")
                return tuple(self._mask(grads, stats) for grads in factors)
            g = self._mask(reconstruct(G, A, B, s, c.reconstruction), stats)
            grad_A, grad_B, residual = project_to_lora(g, A, B, s, A.shape[0], c.projection, generator, c.oversample,
                                                       return_residual=True)
            if residual is not None:
                stats.residuals.append(residual)
            return grad_A, grad_B

    def _mask(self, grads: Tensor, stats: _MaskStats) -> Tensor:
        """ḡ ⊙ M for per-domain gradients (N, ...): M = exp(−τ·V̂), or the unanimous-sign AND-mask (ablation)."""
        c = self.config
        if c.mask == "exp":
            mean, mask, vhat = conflict_mask(grads, c.tau, c.mask_normalize, return_variance=True)
        else:
            mean, vhat = normalized_variance(grads, c.mask_normalize)
            mask = combine.agreement_mask(grads, 1.0)
        stats.add(mask, vhat)
        return mean * mask

    def step(self, batch: Batch) -> dict[str, float]:
        n = batch.n_domains
        stats, grads = _MaskStats(), {}
        # Autograd fills the LoRA .grad too; IGA's gradient replaces that part.
        stash = _stash_lora_grads(self.layers)

        def combine(layer: LoraLayer, G: Tensor) -> None:
            total = self.world.reduce_to(G, self.world.owner(self.index[layer.name]))
            if total is not None:
                grads[layer.name] = self._combine(layer, total, batch.seed, stats)

        if self.config.passes == "one":
            with per_domain_gradients(self.layers, n, combine):
                per_domain = domain_means(*token_losses(self.model, batch), n, self.world)
                per_domain.mean().backward()
        else:  # the paper's way: one forward+backward per domain, every module's N buffers held at once
            collected: dict[str, list[Tensor]] = {layer.name: [] for layer in self.layers}
            losses = []
            rows = batch.input_ids.shape[0] // n
            for d in range(n):
                part = slice(d * rows, (d + 1) * rows)
                sub = Batch(batch.input_ids[part], batch.attention_mask[part], batch.labels[part], 1, batch.seed)
                with per_domain_gradients(self.layers, 1, lambda layer, G: collected[layer.name].append(G[0])):
                    loss = domain_means(*token_losses(self.model, sub), 1, self.world)[0]
                    loss.backward()
                losses.append(loss.detach())
            for layer in self.layers:
                combine(layer, torch.stack(collected.pop(layer.name)))
            per_domain = torch.stack(losses)
        _add_lora_grads({param: new for layer in self.layers if layer.name in grads
                         for param, new in zip((layer.A, layer.B), grads[layer.name])}, stash)
        stats.reduce(self.world)
        return {"loss": per_domain.mean().item(), **self._domain_metrics(per_domain), **stats.metrics()}


class VCD(Method):
    """Validity-calibrated distillation (iga/train/vcd.py): ERM's loss with each teacher line weighted by
    how its verified validity compares with that of the student's own greedy line under the same prefix.
    The student's lines of a row are generated again once they are `refresh` steps old (a resumed run
    regenerates them: it matches an uninterrupted one when checkpoints fall on multiples of `refresh`)."""
    config: VCDConfig

    def __init__(self, model: nn.Module, config: VCDConfig, domains: tuple[str, ...], tokenizer: Any = None,
                 verifier: Any = None, world: World = World()):
        super().__init__(model, config, domains, world)
        if tokenizer is None or verifier is None:
            raise ConfigError("method kind vcd needs the student's tokenizer and a step verifier (iga.data.verify)")
        self.tokenizer, self.verifier = tokenizer, verifier
        self.now = 0
        self.v_teacher: dict[str, list[float]] = {}
        self.v_student: dict[str, tuple[int, list[float]]] = {}  # row -> (step generated, validity per line)

    def begin_step(self, step: int, total: int) -> bool:
        self.now = step
        return False

    def _validities(self, rows: list[dict[str, Any]]) -> tuple[list[list[float]], list[list[float]]]:
        """(v_teacher, v_student) per line of each row, verifying what is missing or stale."""
        keys = [f"{r['group_id']}|{r['domain']}" for r in rows]
        lines = {k: r["cot_solution"].split("\n") for k, r in zip(keys, rows)}
        new_t = {k: r for k, r in zip(keys, rows) if k not in self.v_teacher}
        if new_t:
            items = [(r, lines[k][:i], lines[k][i]) for k, r in new_t.items() for i in range(len(lines[k]))]
            found = iter(self.verifier.verify_many(items))
            for k in new_t:
                self.v_teacher[k] = [next(found) for _ in lines[k]]
        stale = {k: r for k, r in zip(keys, rows)
                 if k not in self.v_student or self.now - self.v_student[k][0] >= self.config.refresh}
        if stale:
            requests = [(r, lines[k][:i]) for k, r in stale.items() for i in range(len(lines[k]))]
            proposed = propose_lines(self.model, self.tokenizer, [(r["problem"], prefix) for r, prefix in requests],
                                     self.config.max_line_tokens)
            found = iter(self.verifier.verify_many([(r, prefix, line) for (r, prefix), line in zip(requests, proposed)]))
            for k in stale:
                self.v_student[k] = (self.now, [next(found) for _ in lines[k]])
        return [self.v_teacher[k] for k in keys], [self.v_student[k][1] for k in keys]

    def step(self, batch: Batch) -> dict[str, float]:
        if batch.sources is None:
            raise ConfigError("method kind vcd needs batches that carry their data rows (iga.train.sft.encode_groups)")
        c, rows = self.config, list(batch.sources)
        t0 = time.perf_counter()
        v_teacher, v_student = self._validities(rows)
        proposal_s = time.perf_counter() - t0
        weights = []
        for row, vt, vs in zip(rows, v_teacher, v_student):
            per_line = [line_weight(t, s, c.beta, c.w_min, c.w_max) for t, s in zip(vt, vs)]
            weights += [per_line[i] for i in token_lines(self.tokenizer, row["cot_solution"])]
        labelled = int((batch.labels[:, 1:] != IGNORE).sum())
        if len(weights) != labelled:
            raise ConfigError(f"vcd: {len(weights)} token weights for {labelled} completion tokens: the batch was "
                              "not encoded with iga.train.sft.encode")
        w = torch.tensor(weights, dtype=torch.float32, device=batch.labels.device)
        sums, counts, _ = forward_losses(self.model, batch, weights=w)
        loss = token_mean(sums, counts, self.world)
        loss.backward()
        flat_t = [v for vt in v_teacher for v in vt]
        flat_s = [v for vs in v_student for v in vs]
        return {"loss": loss.item(), **self._domain_metrics(domain_means(sums, counts, batch.n_domains, self.world)),
                "weight_mean": float(w.mean()), "v_teacher": sum(flat_t) / len(flat_t),
                "v_student": sum(flat_s) / len(flat_s), "proposal_s": proposal_s}


METHODS: dict[str, type[Method]] = {"erm": ERM, "iga": IGA, "irm": Penalty, "vrex": Penalty, "pcgrad": GradientRule,
                                    "and_mask": GradientRule, "sand_mask": GradientRule, "pareto_gs": GradientRule,
                                    "vcd": VCD}


def build_method(config: MethodConfig, model: nn.Module, domains: tuple[str, ...], tokenizer: Any = None,
                 verifier: Any = None, world: World = World()) -> Method:
    """The method of `config`; VCD also reads the student's text (tokenizer) and verifies steps (verifier)."""
    if isinstance(config, VCDConfig):
        return VCD(model, config, domains, tokenizer, verifier, world)
    return METHODS[config.kind](model, config, domains, world)
