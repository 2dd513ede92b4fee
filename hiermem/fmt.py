"""Human-readable numbers for tables and logs: the one formatting helper of the CLI."""

from __future__ import annotations

# counts of parameters use B (billion, as the paper writes 4.6B); rates and FLOPs use SI G
_COUNT = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))
_SI = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))
_BYTES = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3))


def human(n: float, si: bool = False) -> str:
    """1.23M, 4.60B (parameter counts), or with si=True 3.1G / 2.0P (FLOPs, rates)."""
    for unit, scale in _SI if si else _COUNT:
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    """Decimal bytes: 1.50 GB."""
    for unit, scale in _BYTES:
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} B"


def human_seconds(s: float) -> str:
    """45 s, 12.5 min, 3.2 h."""
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
