"""Validity-calibrated distillation, after "Validity-Calibrated Reasoning Distillation" (2026): at each
step boundary of a training CoT, the student proposes its own next line under the teacher's prefix; a
verifier (iga/data/verify.py) scores the local validity v in [0, 1] of the student's line and of the
teacher's; the loss on the teacher's line is weighted by

    w = clip(1 + beta * min(v_teacher - v_student, 2 v_teacher - 1), w_min, w_max)

The source gives no formula, only that the relative local validity of the two lines modulates how
strongly the student learns the teacher's; this weight and the exact verifier are this project's
construction (docs/selection.md):

- teacher right, student wrong (1, 0): w = 1 + beta, learn this line harder;
- both right: w = 1, plain imitation;
- teacher wrong, whatever the student (0, v): w = 1 - beta, clipped at w_min: a flawed line is not
  copied at full weight; the student's line being wrong too is no reason to learn the teacher's flaw
  (with clip(1 + beta (v_t - v_s)) alone, two wrong lines gave w = 1). w_min = 0 drops the line.

beta = 0 is ERM exactly (every weight is 1.0, and x * 1.0 == x in floating point). The loss is
normalised by the token count, as ERM's, not by the weights: a weight changes how much a line counts,
not the scale of the others. Helpers only; the method is `VCD` in iga/train/methods.py.
"""
from __future__ import annotations

from typing import Any

import torch

from iga.train.decode import Stop, generate
from iga.train.sft import prompt_text


def line_weight(v_teacher: float, v_student: float, beta: float, w_min: float, w_max: float) -> float:
    """The teacher line's weight: its validity against the student's, capped by its own (2 v_t - 1 is
    below 0 for a line that is less than half valid, so no student line can lift its weight to 1)."""
    return min(w_max, max(w_min, 1.0 + beta * min(v_teacher - v_student, 2.0 * v_teacher - 1.0)))


def token_lines(tokenizer: Any, target: str) -> list[int]:
    """The CoT line (0-based) of each completion token, as `iga.train.sft.encode` tokenizes `target`
    (plus the end-of-turn token, which belongs to the last line). A token that holds a newline and the
    start of the next line belongs to the line its last character is in."""
    text = target + tokenizer.eos_token
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    last = target.count("\n")
    return [min(last, text.count("\n", 0, max(start, end - 1))) for start, end in enc["offset_mapping"]]


@torch.no_grad()
def propose_lines(model: Any, tokenizer: Any, requests: list[tuple[str, list[str]]], max_tokens: int,
                  batch_size: int = 32) -> list[str]:
    """The student's greedy next line after each (problem, gold prefix lines), in its chat template."""
    texts = [prompt_text(tokenizer, problem) + "".join(line + "\n" for line in prefix) for problem, prefix in requests]
    done = generate(model, tokenizer, texts, max_tokens, batch_size, Stop(lines=1))
    return [c.text.lstrip("\n").split("\n", 1)[0].strip() for c in done]
