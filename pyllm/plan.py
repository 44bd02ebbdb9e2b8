"""Compute-optimal sizing (Hoffmann et al. 2022, "Chinchilla"): train N parameters on about
20 N tokens, at C = 6 N D training FLOPs."""
from __future__ import annotations

import math
import re

TOKENS_PER_PARAM = 20.0
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_number(text: str | float | int) -> float:
    """'124M', '1.5B', '3e21', '7b' -> float."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", str(text).lower())
    if not m and re.fullmatch(r"\s*-.*", str(text)):
        raise ValueError(f"must be positive, got {text!r} (examples: 124M, 1.5B, 3e21)")
    if not m:
        raise ValueError(f"not a number: {text!r} (examples: 124M, 1.5B, 3e21)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def chinchilla(compute: float | None = None, params: float | None = None,
               tokens_per_param: float = TOKENS_PER_PARAM) -> dict:
    """Given a FLOP budget C: N = sqrt(C / (6 r)), D = r N. Given N: D = r N, C = 6 N D."""
    if (compute is None) == (params is None):
        raise ValueError("give exactly one of a compute budget (FLOPs) or a parameter count")
    for name, value in (("compute budget", compute), ("parameter count", params), ("tokens_per_param", tokens_per_param)):
        # (not `<= 0`, which NaN passes: a negative tokens_per_param had planned negative tokens)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if compute is not None:
        params = math.sqrt(compute / (6 * tokens_per_param))
    tokens = tokens_per_param * params
    return {"params": params, "tokens": tokens, "flops": 6 * params * tokens}


def human(x: float) -> str:
    x = float(f"{x:.3g}")  # rounded before the unit is chosen (999.6M had printed as "1e+03M")
    if abs(x) >= 1e15:
        return f"{x:.3g}"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def human_time(seconds: float) -> str:
    seconds = float(f"{seconds:.3g}")  # (3599 s had printed as "60 minutes")
    for unit, scale in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"
