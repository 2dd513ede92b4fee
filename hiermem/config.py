"""Model and memory configs, the paper's anchor presets and the tiny CPU family.

`ModelConfig` describes the anchor transformer, `MemoryConfig` the hierarchical memory bank.
Presets reproduce the paper's parameter counts exactly at vocab 50,432 (paper-notes §4):

    openlm-160m   35 layers, d=512,  12 heads x 32, FFN 2048, tied       163,510,016
    openlm-410m   24 layers, d=1024, 16 heads x 64, FFN 2816, untied     411,665,408
    openlm-1b     24 layers, d=2048, 16 heads x 128, FFN 5632, untied  1,439,893,504
    d1024-l{12,17,19,21,22,24}   Table 8's d=1024 family (16 heads x 64, FFN 2816, untied)

and `tiny-d{N}` is the CPU family driven by one dial, the depth N: width 64*N, head dim 32
(so 2*N heads), FFN 4*width, tied embeddings (the 160M's choices), vocab 8192.
"""

from __future__ import annotations

import dataclasses
import math
import re

from hiermem.configbase import Config, require

PAPER_VOCAB = 50_432
MEMORY_TYPES = ("ffn", "lora-ffn", "lora-qk", "lora-vo", "kv")
PLACEMENTS = ("uniform", "early", "middle", "late")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """Anchor transformer shape. Attention width is `n_heads * head_dim`, independent of `d_model`."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 512
    vocab_size: int = 8192
    tie_embeddings: bool = True
    rope_base: float = 100_000.0
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "head_dim", "ffn_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, name, "a positive integer", value)
        require(self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)", self.head_dim)
        require(self.rope_base > 1, "rope_base", "a number > 1", self.rope_base)
        require(self.norm_eps > 0, "norm_eps", "a positive number", self.norm_eps)
        require(self.init_std > 0, "init_std", "a positive number", self.init_std)

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim


def _openlm_ffn(d: int) -> int:
    """OpenLM's default SwiGLU inner dimension: 256 * ceil((8d/3) / 256)."""
    return 256 * -(-(8 * d // 3) // 256)


def tiny_config(depth: int, vocab_size: int = 8192, max_seq_len: int = 1024) -> ModelConfig:
    """The CPU family: everything derived from the depth dial (width 64*depth, head dim 32)."""
    require(isinstance(depth, int) and depth > 0, "depth", "a positive integer", depth)
    d = 64 * depth
    return ModelConfig(d_model=d, n_layers=depth, n_heads=d // 32, head_dim=32, ffn_dim=4 * d,
                       vocab_size=vocab_size, tie_embeddings=True, max_seq_len=max_seq_len)


_PRESETS: dict[str, ModelConfig] = {
    "openlm-160m": ModelConfig(d_model=512, n_layers=35, n_heads=12, head_dim=32, ffn_dim=2048,
                               vocab_size=PAPER_VOCAB, tie_embeddings=True),
    "openlm-410m": ModelConfig(d_model=1024, n_layers=24, n_heads=16, head_dim=64, ffn_dim=_openlm_ffn(1024),
                               vocab_size=PAPER_VOCAB, tie_embeddings=False),
    "openlm-1b": ModelConfig(d_model=2048, n_layers=24, n_heads=16, head_dim=128, ffn_dim=_openlm_ffn(2048),
                             vocab_size=PAPER_VOCAB, tie_embeddings=False),
}
for _layers in (12, 17, 19, 21, 22, 24):
    _PRESETS[f"d1024-l{_layers}"] = ModelConfig(d_model=1024, n_layers=_layers, n_heads=16, head_dim=64,
                                                ffn_dim=_openlm_ffn(1024), vocab_size=PAPER_VOCAB,
                                                tie_embeddings=False)


def preset_names() -> list[str]:
    return sorted(_PRESETS) + ["tiny-d<N>"]


def model_preset(name: str, **overrides) -> ModelConfig:
    """A named anchor: a paper preset, or `tiny-d<N>` for the depth-dial CPU family."""
    match = re.fullmatch(r"tiny-d(\d+)", name)
    if match:
        cfg = tiny_config(int(match.group(1)))
    elif name in _PRESETS:
        cfg = _PRESETS[name]
    else:
        raise ValueError(f"unknown anchor preset {name!r}; allowed: {', '.join(preset_names())}")
    return cfg.replace(**overrides) if overrides else cfg


@dataclasses.dataclass(frozen=True)
class MemoryConfig(Config):
    """Hierarchical memory bank: `multipliers` are the paper's (r1, ..., rp), one per tree level.

    Each level-l node owns one block of r_l units *per memory layer*; a unit is one SwiGLU hidden
    unit (FFN), one LoRA rank (LoRA), or one key/value pair (KV). A sequence fetches the p blocks on
    its root-to-leaf path and concatenates them. `(0, 0, 0, 0)` means no memory.

    placement: "uniform" (every layer), "early" / "middle" / "late" (a third of the layers, the
    paper's Table 9), or an explicit comma list of layer indices such as "0,3,5".
    scale_units_to_uniform: with a non-uniform placement, multiply each r_l by
    n_layers / n_memory_layers (rounded) so the memory has the parameters a uniform one would.
    init_std: standard deviation of the truncated-normal tensors (FFN gate/up rows, KV keys); None
    means 1/sqrt(d_model), which gives memory hidden units pre-activations of order one (with 0.02
    they are ~1/sqrt(d)/0.02 times smaller and rarely fetched blocks learn slowly).
    """

    type: str = "ffn"
    multipliers: tuple[int, ...] = (16, 4, 1)
    branching: int | None = None  # blocks per node; None: the data tree's (TrainConfig sets it)
    placement: str = "uniform"
    scale_units_to_uniform: bool = False
    generic: bool = True
    lora_alpha: float = 2.0
    init_std: float | None = None

    def validate(self) -> None:
        require(self.type in MEMORY_TYPES, "type", f"one of {list(MEMORY_TYPES)}", self.type)
        require(len(self.multipliers) >= 1, "multipliers", "at least one level", self.multipliers)
        for i, r in enumerate(self.multipliers):
            require(isinstance(r, int) and r >= 0, f"multipliers[{i}]", "a non-negative integer", r)
        require(self.branching is None or (isinstance(self.branching, int) and self.branching >= 2), "branching",
                "null (the data tree's) or an integer >= 2", self.branching)
        require(self.lora_alpha > 0, "lora_alpha", "a positive number", self.lora_alpha)
        require(self.init_std is None or self.init_std > 0, "init_std", "a positive number or null (1/sqrt(d))",
                self.init_std)
        if self.placement not in PLACEMENTS:
            require(re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", self.placement) is not None, "placement",
                    f"one of {list(PLACEMENTS)} or a comma list of layer indices", self.placement)

    @property
    def depth(self) -> int:
        return len(self.multipliers)

    @property
    def enabled(self) -> bool:
        return any(r > 0 for r in self.multipliers)

    def memory_layers(self, n_layers: int) -> tuple[int, ...]:
        """Indices of the anchor layers that carry memory."""
        if self.placement == "uniform":
            return tuple(range(n_layers))
        if self.placement in ("early", "middle", "late"):
            n = max(1, n_layers // 3)
            start = {"early": 0, "middle": (n_layers - n) // 2, "late": n_layers - n}[self.placement]
            return tuple(range(start, start + n))
        layers = tuple(sorted({int(x) for x in self.placement.split(",")}))
        require(all(0 <= i < n_layers for i in layers), "placement",
                f"layer indices in [0, {n_layers - 1}]", self.placement)
        return layers

    def units_per_layer(self, n_layers: int) -> tuple[int, ...]:
        """r_l per memory layer, after the optional rescaling for non-uniform placements."""
        if not self.scale_units_to_uniform:
            return self.multipliers
        n_mem = len(self.memory_layers(n_layers))
        return tuple(round(r * n_layers / n_mem) for r in self.multipliers)

    def resolved_init_std(self, d_model: int) -> float:
        return 1.0 / math.sqrt(d_model) if self.init_std is None else self.init_std

    def nodes_at_level(self, level: int) -> int:
        """Number of tree nodes (memory blocks) at 0-based `level`: k^(level+1)."""
        require(self.branching is not None, "memory.branching", "an integer >= 2 to size a bank (null is only "
                "resolved from data.tree inside a TrainConfig)", self.branching)
        return self.branching ** (level + 1)


def parse_multipliers(text: str) -> tuple[int, ...]:
    """'256,64,16,0' -> (256, 64, 16, 0), with an error naming the field on bad input."""
    try:
        values = tuple(int(x) for x in str(text).replace("(", "").replace(")", "").split(",") if x.strip())
    except ValueError:
        raise ValueError(f"invalid config field 'multipliers': expected comma-separated non-negative "
                         f"integers like 256,64,16,0, got {text!r}") from None
    require(len(values) >= 1, "multipliers", "at least one level", text)
    return values
