"""Final-answer extraction and normalisation, shared by the gates and the evaluation."""
from __future__ import annotations

import re

ANSWER_LINE = re.compile(r"^\s*(?:final\s+)?answer\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_GSM = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"^[-+]?\$?\s*(\d[\d,]*(?:\.\d+)?)")


def answer_text(text: str | None) -> str | None:
    """The raw X of the last `Answer: X` (or GSM8K `#### X`) line of a solution; None if absent."""
    if not text:
        return None
    found = ANSWER_LINE.findall(text) or _GSM.findall(text)
    return found[-1] if found else None


def extract_answer(text: str | None) -> str | None:
    """The last `Answer: X` (or GSM8K `#### X`) line of a solution, normalised; None if absent."""
    raw = answer_text(text)
    return normalize_answer(raw) if raw is not None else None


def normalize_answer(ans: str) -> str | None:
    """Lower-case, trimmed; numbers lose thousands separators, units and trailing `.0`."""
    s = ans.strip().rstrip(".").strip().lower()
    m = _NUMBER.match(s)
    if m:
        num = m.group(1).replace(",", "")
        sign = "-" if s.startswith("-") else ""
        if "." in num:
            num = num.rstrip("0").rstrip(".")
        return sign + num
    return re.sub(r"\s+", " ", s) or None


def count_steps(cot: str | None) -> int | None:
    """CoT steps: non-blank lines other than the final-answer line."""
    if not cot:
        return None
    lines = [ln for ln in cot.splitlines() if ln.strip()]
    return sum(1 for ln in lines if not (ANSWER_LINE.match(ln) or _GSM.match(ln)))
