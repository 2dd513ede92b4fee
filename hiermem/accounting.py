"""Parameter, FLOP and byte accounting, computed from configs (a 21B bank is counted, never built).

Conventions (every scaling fit must name one; these are the defaults of our results tables):
- `embedding_params`: input embedding, plus the output head when it is not tied;
- `anchor_params`: all anchor parameters (embeddings included), the paper's "model size";
- `anchor_non_embedding_params`: anchor minus embeddings (the N of Kaplan/Chinchilla-style fits);
- `fetched_params`: parameters one sequence fetches, sum over levels of r_l * n_memory_layers * c;
  with c the per-unit width of the memory type (FFN: 3d, so c0 = 3dL in the paper's notation);
- `bank_params`: all blocks, sum over levels of k^l * fetched_l;
- `generic_params`: the generic block (the size of one fetch) when enabled.

FLOPs per token count multiply-adds as 2 FLOPs. Forward = 2 x (matmul weights) + attention scores
(4 * seq_len * attn_dim per layer, over the full context, as Chinchilla and nanochat count) +
the output head; training = 3 x forward. A fetched memory costs 2 x fetched_params forward for every
memory type (FFN units, LoRA A and B, KV scores and mixing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from hiermem.config import MemoryConfig, ModelConfig, model_preset, parse_multipliers
from hiermem.fmt import human, human_bytes
from hiermem.memory_kinds import MEMORY_KINDS, get_kind

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1,
               "fp8": 1, "int4": 0.5}


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Parameter groups, FLOPs per token and per-level memory sizes of one configuration."""

    embedding_params: int
    attention_params: int
    ffn_params: int
    norm_params: int
    fetched_per_level: tuple[int, ...]
    bank_per_level: tuple[int, ...]
    generic_params: int
    seq_len: int
    anchor_forward_flops_per_token: int
    attention_score_flops_per_token: int
    head_flops_per_token: int
    fetched_forward_flops_per_token: int

    @property
    def anchor_non_embedding_params(self) -> int:
        return self.attention_params + self.ffn_params + self.norm_params

    @property
    def anchor_params(self) -> int:
        return self.embedding_params + self.anchor_non_embedding_params

    @property
    def fetched_params(self) -> int:
        return sum(self.fetched_per_level)

    @property
    def bank_params(self) -> int:
        return sum(self.bank_per_level)

    @property
    def runtime_params(self) -> int:
        """What inference holds for one context: anchor + fetched memory."""
        return self.anchor_params + self.fetched_params

    @property
    def total_params(self) -> int:
        return self.anchor_params + self.bank_params + self.generic_params

    @property
    def forward_flops_per_token(self) -> int:
        return (self.anchor_forward_flops_per_token + self.attention_score_flops_per_token
                + self.head_flops_per_token + self.fetched_forward_flops_per_token)

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3 x forward)."""
        return 3 * self.forward_flops_per_token

    def fetched_bytes_per_level(self, dtype: str = "bfloat16") -> tuple[float, ...]:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown storage dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
        return tuple(n * DTYPE_BYTES[dtype] for n in self.fetched_per_level)

    def bank_bytes_per_level(self, dtype: str = "bfloat16") -> tuple[float, ...]:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown storage dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
        return tuple(n * DTYPE_BYTES[dtype] for n in self.bank_per_level)

    def check(self) -> None:
        """Parts must sum to totals (a bookkeeping bug should fail loudly)."""
        assert self.anchor_params == self.embedding_params + self.attention_params + self.ffn_params + self.norm_params
        assert self.fetched_params == sum(self.fetched_per_level)
        assert self.bank_params == sum(self.bank_per_level)
        assert self.total_params == self.anchor_params + self.bank_params + self.generic_params
        assert 3 * (self.anchor_forward_flops_per_token + self.attention_score_flops_per_token
                    + self.head_flops_per_token + self.fetched_forward_flops_per_token) == self.flops_per_token

    def to_dict(self, dtype: str = "bfloat16") -> dict:
        return {
            "embedding_params": self.embedding_params,
            "anchor_params": self.anchor_params,
            "anchor_non_embedding_params": self.anchor_non_embedding_params,
            "attention_params": self.attention_params,
            "ffn_params": self.ffn_params,
            "norm_params": self.norm_params,
            "fetched_params": self.fetched_params,
            "bank_params": self.bank_params,
            "generic_params": self.generic_params,
            "runtime_params": self.runtime_params,
            "total_params": self.total_params,
            "fetched_per_level": list(self.fetched_per_level),
            "bank_per_level": list(self.bank_per_level),
            "seq_len": self.seq_len,
            "flops_per_token": self.flops_per_token,
            "forward_flops_per_token": self.forward_flops_per_token,
            "anchor_flops_per_token": 3 * (self.anchor_forward_flops_per_token + self.attention_score_flops_per_token
                                           + self.head_flops_per_token),
            "fetched_flops_per_token": 3 * self.fetched_forward_flops_per_token,
            "storage_dtype": dtype,
            "fetched_bytes_per_level": list(self.fetched_bytes_per_level(dtype)),
            "bank_bytes_per_level": list(self.bank_bytes_per_level(dtype)),
        }


def count(model: ModelConfig, memory: MemoryConfig | None = None, seq_len: int | None = None) -> Accounting:
    """Account for an anchor and an optional memory configuration without allocating anything."""
    seq_len = seq_len or model.max_seq_len
    d, a, f, n_layers, vocab = model.d_model, model.attn_dim, model.ffn_dim, model.n_layers, model.vocab_size
    embedding = vocab * d * (1 if model.tie_embeddings else 2)
    attention = n_layers * (d * 3 * a + a * d)
    ffn = n_layers * 3 * d * f
    norms = n_layers * (2 * d + 2 * a) + d
    fetched, bank, generic = (), (), 0
    if memory is not None and memory.enabled:
        width = get_kind(memory.type).unit_width(model)
        n_mem_layers = len(memory.memory_layers(n_layers))
        units = memory.units_per_layer(n_layers)
        fetched = tuple(r * n_mem_layers * width for r in units)
        bank = tuple(memory.nodes_at_level(level) * size for level, size in enumerate(fetched))
        generic = sum(fetched) if memory.generic else 0
    acc = Accounting(
        embedding_params=embedding, attention_params=attention, ffn_params=ffn, norm_params=norms,
        fetched_per_level=fetched, bank_per_level=bank, generic_params=generic, seq_len=seq_len,
        anchor_forward_flops_per_token=2 * (attention + ffn),
        attention_score_flops_per_token=n_layers * 4 * seq_len * a,
        head_flops_per_token=2 * vocab * d,
        fetched_forward_flops_per_token=2 * sum(fetched),
    )
    acc.check()
    return acc


# ------------------------------------------------------------------------------------------ CLI
def format_table(acc: Accounting, dtype: str = "bfloat16") -> str:
    rows = [("embedding params", acc.embedding_params),
            ("anchor non-embedding params", acc.anchor_non_embedding_params),
            ("anchor params (total)", acc.anchor_params)]
    fetched_bytes, bank_bytes = acc.fetched_bytes_per_level(dtype), acc.bank_bytes_per_level(dtype)
    for level, (fp, bp) in enumerate(zip(acc.fetched_per_level, acc.bank_per_level), start=1):
        rows.append((f"level {level}: fetched / bank params", f"{fp:,} / {bp:,}"))
        rows.append((f"level {level}: fetched / bank bytes ({dtype})",
                     f"{human_bytes(fetched_bytes[level - 1])} / {human_bytes(bank_bytes[level - 1])}"))
    rows += [("fetched params (per context)", acc.fetched_params), ("bank params", acc.bank_params),
             ("generic block params", acc.generic_params), ("runtime params (anchor + fetched)", acc.runtime_params),
             ("training FLOPs / token", acc.flops_per_token),
             ("  of which fetched memory", 3 * acc.fetched_forward_flops_per_token)]
    width = max(len(name) for name, _ in rows)
    lines = []
    for name, value in rows:
        text = f"{value:,}  ({human(value)})" if isinstance(value, int) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def _run_count(args: argparse.Namespace) -> int:
    if args.hf:  # a Hugging Face config.json (post-hoc memories, hiermem.hf)
        from hiermem.hf import hf_model_config
        path = Path(args.hf)
        if not path.is_file():
            raise FileNotFoundError(f"--hf: no such config file {str(path)!r} (a model's config.json)")
        model = hf_model_config(json.loads(path.read_text()))
        args.anchor = f"{path} ({model.d_model} wide, {model.n_layers} layers)"
    else:
        model = model_preset(args.anchor)
    if args.vocab is not None:
        model = model.replace(vocab_size=args.vocab)
    memory = None
    if args.memory:
        memory = MemoryConfig(type=args.memory_type, multipliers=parse_multipliers(args.memory), branching=args.k,
                              placement=args.placement, generic=not args.no_generic)
    acc = count(model, memory, seq_len=args.seq_len)
    estimate = None
    if args.tiers is not None:  # storage tiers and fetch cost (hiermem.tiers)
        from hiermem.tiers import estimate_for, format_estimate
        if memory is None:
            raise ValueError("--tiers needs a memory configuration (--memory r1,r2,...): a dense model fetches nothing")
        estimate = estimate_for(acc, args.dtype, args.tiers, args.tier_preset, args.tier_spec or (), args.flat_tier,
                                args.overlap)
    if args.json:
        out = {"anchor": args.anchor, "memory": list(memory.multipliers) if memory else None,
               "memory_type": args.memory_type, "k": args.k, **acc.to_dict(args.dtype)}
        if estimate is not None:
            out["tiers"] = estimate.to_dict()
        print(json.dumps(out, indent=2))
    else:
        title = f"{args.anchor}" + (f" + {args.memory_type} memory {memory.multipliers}, k={args.k}" if memory else "")
        print(title)
        print(format_table(acc, args.dtype))
        if estimate is not None:
            print()
            print(format_estimate(estimate))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("count", help="parameters, FLOPs and bytes of an anchor + memory config (nothing allocated)",
                       description="Answer 'how big is this?' for any anchor preset and memory configuration.")
    p.add_argument("--anchor", default="openlm-160m",
                   help="anchor preset (default openlm-160m): openlm-160m, openlm-410m, openlm-1b, "
                        "d1024-l12/l17/l19/l21/l22/l24 (the paper's Table 8), tiny-d<N> (N >= 1)")
    p.add_argument("--hf", default=None, metavar="CONFIG.json",
                   help="a Hugging Face model's config.json instead of a preset (post-hoc FFN memories on it; its "
                        "fetched and bank sizes are exact, its anchor lines follow hiermem's layout)")
    p.add_argument("--memory", default=None, help="per-level multipliers r1,...,rp, e.g. 256,64,16,0")
    p.add_argument("--k", type=int, default=16, help="branching factor of the tree (default 16)")
    p.add_argument("--memory-type", default="ffn", help=" | ".join(MEMORY_KINDS))
    p.add_argument("--placement", default="uniform",
                   help="uniform (default) | early | middle | late | a comma list of layer indices, e.g. '0,3,5'")
    p.add_argument("--no-generic", action="store_true", help="do not count a generic block")
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--seq-len", type=int, default=2048, help="context length for attention FLOPs (default 2048)")
    p.add_argument("--dtype", default="bfloat16",
                   help=f"storage dtype for byte counts (default bfloat16): {', '.join(DTYPE_BYTES)}")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.add_argument("--tiers", nargs="?", const="default", default=None, metavar="PLACEMENT",
                   help="fetch cost per document on storage tiers: one tier per level, e.g. flash,disk,network "
                        "(the default) or 1=flash,2=disk; against a flat single-level bank of the same size "
                        "(README: 'Storage tiers and fetch cost')")
    p.add_argument("--tier-preset", default="server", help="tier parameters: server (default) | laptop")
    p.add_argument("--tier-spec", action="append", default=None, metavar="SPEC",
                   help="override or add a tier: NAME=BANDWIDTH:LATENCY (bytes/s : s), e.g. flash=2e9:1e-4, or a YAML "
                        "file {name: {bandwidth, latency}}; repeatable")
    p.add_argument("--flat-tier", default="disk", help="the tier holding the flat bank compared with (default disk)")
    p.add_argument("--overlap", default="parallel", choices=["parallel", "sequential"],
                   help="levels on different tiers read concurrently (default) or one after another")
    p.set_defaults(func=_run_count)
