"""Storage tiers and fetch cost: where the anchor and each memory level live, and what a document's
fetch costs (`hiermem count ... --tiers`).

A memory is chosen once per context (document, prompt), so a deployment can keep the anchor in RAM
and each level of the bank on the storage that fits its size: the shallow levels are small banks with
large blocks, the deep ones huge banks with small blocks. Per document the model reads one block per
level.

The model (stated, not measured; `bench/fetch_latency.py` measures this machine's disk):

- a tier is (bandwidth B bytes/s, latency L s); reading b contiguous bytes takes `L + b / B`
  (a block is one contiguous row of its level's file, so one read);
- levels on *different* tiers are read concurrently, levels on the *same* tier one after another, so
  the fetch time of a document is `max over tiers of sum over that tier's levels of (L + b_l / B)`
  (`overlap="sequential"` sums every level instead: one device queue, no concurrency);
- the **flat bank** it is compared with has the same total size (sum of the level banks) and the same
  fetch per document (sum of the fetched bytes), in a single level: one block of `sum_l b_l` bytes, read
  in one piece from one tier, `flat_tier` (default `disk`: the paper's example puts it "on external
  disk"; a flat bank of the whole size cannot use the fast tiers, which only hold the shallow levels).

Presets (`TIER_PRESETS`; every value is a documented device class, see the README section "Storage
tiers and fetch cost"): `server` (the default) and `laptop`. `--tier-spec flash=2e9:1e-4` overrides one
tier (bandwidth in bytes/s, latency in s), `--tier-spec FILE.yaml` reads `{name: {bandwidth, latency}}`.

The paper's deployment example (Figure 5 and the authors' announcement: anchor 0.8 GB in RAM, level 1
39 GB on flash, level 2 155 GB on external disk, level 3 618 GB in the cloud; 38 ms against 198 ms for a
flat bank) is `paper_example()`: those sizes are exactly the bf16 bytes of openlm-410m (0.82 GB) with FFN
memories (16384, 4096, 1024) on a 16-ary tree (banks 38.65 / 154.6 / 618.5 GB, fetched 2.42 GB / 604 MB
/ 151 MB per document), and the `server` tiers give 37.9 ms and 198.3 ms. Note the ratio:
38/198 = 0.19 ~ 4/21 = b_2 / (b_1 + b_2 + b_3), i.e. the external disk's level-2 read dominates the
concurrent hierarchical fetch while the flat bank reads all 21 parts from the same disk.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import yaml


@dataclasses.dataclass(frozen=True)
class Tier:
    """A storage tier: sustained sequential read bandwidth (bytes/s) and latency per read (s)."""

    name: str
    bandwidth: float
    latency: float
    note: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.bandwidth, (int, float)) and self.bandwidth > 0):
            raise ValueError(f"tier {self.name!r}: bandwidth must be a positive number of bytes/s, got {self.bandwidth!r}")
        if not (isinstance(self.latency, (int, float)) and self.latency >= 0):
            raise ValueError(f"tier {self.name!r}: latency must be a non-negative number of seconds, "
                             f"got {self.latency!r}")

    def read_time(self, nbytes: float, reads: int = 1) -> float:
        """Seconds to read `nbytes` in `reads` contiguous pieces."""
        return reads * self.latency + nbytes / self.bandwidth


TIER_PRESETS: dict[str, dict[str, Tier]] = {
    # reproduces the paper's example with its bytes (see the module docstring and the README)
    "server": {
        "ram": Tier("ram", 200e9, 1e-7, "8-channel DDR5-4800 (307 GB/s peak), ~200 GB/s sustained, ~100 ns"),
        "flash": Tier("flash", 80e9, 8e-5, "8 PCIe 5.0 x4 NVMe SSDs striped (~14 GB/s each), ~80 us per read"),
        "disk": Tier("disk", 16e9, 1e-4, "external NVMe enclosure on PCIe 4.0 x16 with 4 PCIe 4.0 SSDs striped "
                                         "(~7 GB/s each), 16 GB/s sustained, ~100 us per read"),
        "network": Tier("network", 12.5e9, 1e-2, "cloud object store over 100 GbE (12.5 GB/s), ~10 ms to first byte"),
    },
    "laptop": {
        "ram": Tier("ram", 100e9, 1e-7, "LPDDR5X unified memory, ~100 GB/s"),
        "flash": Tier("flash", 7e9, 5e-5, "internal PCIe 4.0 NVMe SSD, ~7 GB/s, ~50 us"),
        "disk": Tier("disk", 3e9, 2e-4, "external NVMe SSD over Thunderbolt 4 / USB4, ~3 GB/s, ~200 us"),
        "network": Tier("network", 125e6, 2e-2, "1 Gb/s internet link, 20 ms round trip"),
    },
}
DEFAULT_PRESET = "server"
DEFAULT_PLACEMENT = ("flash", "disk", "network")  # level 1, 2, 3 (deeper levels: the last one)
ANCHOR_TIER = "ram"
OVERLAPS = ("parallel", "sequential")


def tiers(preset: str = DEFAULT_PRESET, specs: Sequence[str] = ()) -> dict[str, Tier]:
    """The tiers of a preset with `specs` applied in order: 'NAME=BANDWIDTH:LATENCY' (bytes/s : s; a new
    name adds a tier) or the path of a YAML file mapping names to {bandwidth, latency}."""
    if preset not in TIER_PRESETS:
        raise ValueError(f"unknown tier preset {preset!r}; known: {', '.join(TIER_PRESETS)}")
    out = dict(TIER_PRESETS[preset])
    for spec in specs:
        out.update(parse_tier_spec(spec, out))
    return out


def parse_tier_spec(spec: str, known: Mapping[str, Tier] | None = None) -> dict[str, Tier]:
    """'flash=2e9:1e-4' -> {flash: Tier(2e9 B/s, 1e-4 s)}; a .yaml/.yml path -> its tiers."""
    spec = str(spec).strip()
    if spec.endswith((".yaml", ".yml")) and "=" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"tier spec file {spec!r} not found")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        data = data.get("tiers", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ValueError(f"tier spec file {spec!r}: expected a mapping of tier names to {{bandwidth, latency}}")
        out = {}
        for name, fields in data.items():
            if not isinstance(fields, dict) or not {"bandwidth", "latency"} <= set(fields):
                raise ValueError(f"tier spec file {spec!r}: tier {name!r} needs 'bandwidth' (bytes/s) and 'latency' (s)")
            out[str(name)] = Tier(str(name), _number(fields["bandwidth"], name, "bandwidth"),
                                  _number(fields["latency"], name, "latency"), str(fields.get("note", "")))
        return out
    name, sep, values = spec.partition("=")
    parts = values.split(":")
    if not sep or not name.strip() or len(parts) != 2:
        raise ValueError(f"tier spec {spec!r} must look like NAME=BANDWIDTH:LATENCY (bytes/s : seconds), e.g. "
                         f"flash=2e9:1e-4, or be a YAML file")
    name = name.strip()
    return {name: Tier(name, _number(parts[0], name, "bandwidth"), _number(parts[1], name, "latency"),
                       f"--tier-spec {spec}")}


def _number(value, tier: str, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"tier {tier!r}: {what} must be a number, got {value!r}") from None


def parse_placement(text: str | Sequence[str] | None, depth: int, known: Mapping[str, Tier]) -> tuple[str, ...]:
    """One tier name per level: 'flash,disk,network' or '1=flash,2=disk,3=network'; None -> the default
    (flash, disk, network; deeper levels on the last). Unknown tiers are refused, naming them."""
    if text is None or text == "default":
        names = [DEFAULT_PLACEMENT[min(level, len(DEFAULT_PLACEMENT) - 1)] for level in range(depth)]
    else:
        items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
        if items and all("=" in t for t in items):
            mapping = {}
            for item in items:
                level, _, name = item.partition("=")
                if not level.strip().isdigit() or not 1 <= int(level) <= depth:
                    raise ValueError(f"placement {item!r}: level must be 1..{depth}")
                mapping[int(level)] = name.strip()
            missing = [level for level in range(1, depth + 1) if level not in mapping]
            if missing:
                raise ValueError(f"placement {text!r} gives no tier for level(s) {missing}")
            names = [mapping[level] for level in range(1, depth + 1)]
        else:
            if len(items) != depth:
                raise ValueError(f"placement {text!r} names {len(items)} tier(s) for {depth} memory level(s)")
            names = items
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown tier {unknown[0]!r} in the placement; known tiers: {', '.join(known)} "
                         f"(add one with --tier-spec NAME=BANDWIDTH:LATENCY)")
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class FetchEstimate:
    """Bytes and seconds of one document's fetch under a placement, and of the equal flat bank."""

    levels: tuple[dict, ...]          # level, tier, fetched_bytes, bank_bytes, seconds
    tier_seconds: dict[str, float]    # per tier: its levels read one after another
    overlap: str
    seconds: float                    # per document, hierarchical
    flat_tier: str
    flat_fetched_bytes: float
    flat_bank_bytes: float
    flat_seconds: float
    anchor_bytes: float | None = None
    anchor_tier: str = ANCHOR_TIER
    tiers: tuple[Tier, ...] = ()

    @property
    def fetched_bytes(self) -> float:
        return sum(r["fetched_bytes"] for r in self.levels)

    @property
    def speedup(self) -> float:
        return self.flat_seconds / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"levels": [dict(r) for r in self.levels], "tier_seconds": dict(self.tier_seconds),
                "overlap": self.overlap, "fetched_bytes_per_document": self.fetched_bytes,
                "seconds_per_document": self.seconds, "flat_tier": self.flat_tier,
                "flat_fetched_bytes": self.flat_fetched_bytes, "flat_bank_bytes": self.flat_bank_bytes,
                "flat_seconds_per_document": self.flat_seconds, "speedup": self.speedup,
                "anchor_bytes": self.anchor_bytes, "anchor_tier": self.anchor_tier,
                "tiers": {t.name: {"bandwidth": t.bandwidth, "latency": t.latency, "note": t.note} for t in self.tiers}}


def fetch_estimate(fetched_bytes: Sequence[float], known: Mapping[str, Tier], placement: Sequence[str] | str | None = None,
                   bank_bytes: Sequence[float] | None = None, flat_tier: str = "disk", overlap: str = "parallel",
                   anchor_bytes: float | None = None) -> FetchEstimate:
    """Fetch time per document for levels with `fetched_bytes` (per level, one block each) placed on
    `placement`'s tiers, and for the flat single-level bank of the same size on `flat_tier` (module
    docstring). Levels with 0 bytes (r = 0) are not read."""
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
    depth = len(fetched_bytes)
    if depth == 0 or not any(fetched_bytes):
        raise ValueError("nothing is fetched: give a memory configuration with some r > 0 (--memory r1,r2,...)")
    names = parse_placement(placement, depth, known)
    if flat_tier not in known:
        raise ValueError(f"unknown tier {flat_tier!r} for the flat bank; known tiers: {', '.join(known)}")
    bank_bytes = list(bank_bytes) if bank_bytes is not None else [0.0] * depth
    levels, per_tier = [], {}
    for level, (nbytes, name) in enumerate(zip(fetched_bytes, names), start=1):
        seconds = known[name].read_time(nbytes) if nbytes else 0.0
        levels.append({"level": level, "tier": name, "fetched_bytes": float(nbytes),
                       "bank_bytes": float(bank_bytes[level - 1]), "seconds": seconds})
        if nbytes:
            per_tier[name] = per_tier.get(name, 0.0) + seconds
    total = max(per_tier.values()) if overlap == "parallel" else sum(per_tier.values())
    flat_fetch = float(sum(fetched_bytes))
    return FetchEstimate(levels=tuple(levels), tier_seconds=per_tier, overlap=overlap, seconds=total,
                         flat_tier=flat_tier, flat_fetched_bytes=flat_fetch, flat_bank_bytes=float(sum(bank_bytes)),
                         flat_seconds=known[flat_tier].read_time(flat_fetch), anchor_bytes=anchor_bytes,
                         tiers=tuple(known.values()))


def estimate_for(acc, dtype: str = "bfloat16", placement=None, preset: str = DEFAULT_PRESET, specs: Sequence[str] = (),
                 flat_tier: str = "disk", overlap: str = "parallel") -> FetchEstimate:
    """`fetch_estimate` for an `hiermem.accounting.Accounting` (its per-level fetched and bank bytes)."""
    from hiermem.accounting import DTYPE_BYTES
    known = tiers(preset, specs)
    return fetch_estimate(acc.fetched_bytes_per_level(dtype), known, placement, acc.bank_bytes_per_level(dtype),
                          flat_tier, overlap, anchor_bytes=acc.anchor_params * DTYPE_BYTES[dtype])


PAPER_EXAMPLE = {"anchor": "openlm-410m", "memory": (16384, 4096, 1024), "k": 16, "dtype": "bfloat16",
                 "placement": DEFAULT_PLACEMENT, "flat_tier": "disk", "preset": "server",
                 "quoted_ms": (38, 198), "quoted_gb": (0.8, 39, 155, 618)}


def paper_example(preset: str = "server", specs: Sequence[str] = ()) -> FetchEstimate:
    """The paper's deployment example (module docstring) under a tier preset: 37.9 ms vs 198.3 ms (server)."""
    from hiermem.accounting import count
    from hiermem.config import MemoryConfig, model_preset
    ex = PAPER_EXAMPLE
    acc = count(model_preset(ex["anchor"]), MemoryConfig(type="ffn", multipliers=ex["memory"], branching=ex["k"]))
    return estimate_for(acc, ex["dtype"], ex["placement"], preset, specs, ex["flat_tier"])


def format_estimate(est: FetchEstimate) -> str:
    from hiermem.fmt import human_bytes
    lines = []
    if est.anchor_bytes is not None:
        lines.append(f"anchor: {human_bytes(est.anchor_bytes)} resident in {est.anchor_tier} (not fetched per document)")
    for r in est.levels:
        lines.append(f"level {r['level']}: bank {human_bytes(r['bank_bytes'])} on {r['tier']}, fetched "
                     f"{human_bytes(r['fetched_bytes'])} per document, {r['seconds'] * 1e3:.1f} ms")
    lines.append(f"per document: {human_bytes(est.fetched_bytes)} fetched in {est.seconds * 1e3:.1f} ms "
                 f"({est.overlap} across tiers)")
    lines.append(f"flat single-level bank of the same size ({human_bytes(est.flat_bank_bytes)}) on {est.flat_tier}: "
                 f"{human_bytes(est.flat_fetched_bytes)} in one block, {est.flat_seconds * 1e3:.1f} ms "
                 f"({est.speedup:.1f}x the hierarchical time)")
    used = {r["tier"] for r in est.levels} | {est.flat_tier}
    for t in est.tiers:
        if t.name in used:
            lines.append(f"  tier {t.name}: {t.bandwidth / 1e9:g} GB/s, {t.latency * 1e3:g} ms per read  {t.note}")
    return "\n".join(lines)
