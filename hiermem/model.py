"""The anchor transformer and the anchor + memory language model.

Architecture choices (OpenLM, as used by the paper; paper-notes §4):
- pre-norm residual blocks: x + Attn(LN(x)), then x + FFN(LN(x)), and a final LN;
- LayerNorm with a gain only (no bias), and no bias in any linear layer;
- SwiGLU FFN: W3 [silu(W1 x) * (W2 x)], W1 = gate, W2 = up (fused into one matmul), W3 = down;
- attention width n_heads * head_dim is independent of d_model (the 160M has 12 x 32 = 384 < 512);
- QK-norm: a gain-only LayerNorm over the full query and key vectors (n_heads * head_dim wide);
- rotary position embeddings on queries and keys, base 100,000 by default;
- causal attention restricted to each document of a packed sequence (segment ids), through
  `scaled_dot_product_attention`; padding has segment id -1;
- optional tied input/output embeddings.

Memories (see `hiermem.memory`) enter per memory layer through the hooks of their kind
(`hiermem.memory_kinds`): FFN-memories add hidden units to the SwiGLU, LoRA memories add low-rank
deltas to projections, KV-memories add attention over learned key/values. The model never branches
on the memory type; it calls every hook, and a kind leaves alone what it does not change.

Accounting (parameters by group, FLOPs per token, bytes fetched) lives in `hiermem.accounting` and is
exposed here as methods; `num_params()` counts real tensors and the tests assert both agree.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiermem.config import MemoryConfig, ModelConfig
from hiermem.kernels import attention, rotate_pairs
from hiermem.masks import continuation_attention_mask, document_attention_mask
from hiermem.memory import ActiveRows, FetchedMemory, MemoryBank


def _layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=True, bias=False)


class Rotary(nn.Module):
    """Rotary embeddings on interleaved pairs (x[2i], x[2i+1]), cos/sin cached up to `max_seq_len`.

    The fast path rotates each pair as one complex multiplication (`hiermem.kernels.rotate_pairs`):
    the same products and sums as the plain path's two strided slices, in one kernel each way.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self.fast = True  # False: the plain path (strided slices), kept for the benchmark and the tests

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:  # x: (B, h, T, dh)
        end = offset + x.shape[2]
        if end > self.cos.shape[0]:
            raise ValueError(f"sequence length {end} exceeds the model's max_seq_len {self.cos.shape[0]}")
        cos, sin = self.cos[offset:end].to(x.dtype), self.sin[offset:end].to(x.dtype)
        if self.fast:
            return rotate_pairs(x, cos, sin)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.attn_dim, bias=False)
        self.wo = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)
        self.q_norm = _layer_norm(cfg.attn_dim, cfg.norm_eps)
        self.k_norm = _layer_norm(cfg.attn_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rotary: Rotary, attn_mask: torch.Tensor | None,
                mem: dict[str, torch.Tensor] | None, fetched: FetchedMemory | None,
                cache: dict | None = None, offset: int = 0) -> torch.Tensor:
        batch, t, _ = x.shape
        q, k, v = self.wqkv(x).chunk(3, dim=-1)
        kind = fetched.kind if mem is not None else None
        if kind is not None:
            q, k, v = kind.project_qkv(x, q, k, v, mem, fetched.lora_alpha)
        q, k = self.q_norm(q), self.k_norm(k)
        shape = (batch, t, self.n_heads, self.head_dim)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        q_rot, k_rot = rotary(q, offset), rotary(k, offset)
        if cache is not None:  # incremental decoding: attend over the cached keys and values too
            if "k" in cache:
                k_rot, v = torch.cat([cache["k"], k_rot], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k_rot, v
        if attn_mask is None:
            out = attention(q_rot, k_rot, v, is_causal=True)
        else:
            out = attention(q_rot, k_rot, v, attn_mask=attn_mask)
        if kind is not None:
            # memory keys carry no position, so the queries meet them without rotation
            extra = kind.attend(q, mem, fetched.unit_mask, self.n_heads, self.head_dim)
            if extra is not None:
                out = out + extra
        out = out.transpose(1, 2).reshape(batch, t, -1)
        y = self.wo(out)
        if kind is not None:
            y = kind.project_out(out, y, mem, fetched.lora_alpha)
        return y


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_dim = cfg.ffn_dim
        self.w12 = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)  # [gate (W1); up (W2)]
        self.w3 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)       # down

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The anchor's own SwiGLU, without memory."""
        gate, up = self.w12(x).split(self.ffn_dim, dim=-1)
        return self.w3(F.silu(gate) * up)

    def forward(self, x: torch.Tensor, mem: dict[str, torch.Tensor] | None = None,
                fetched: FetchedMemory | None = None) -> torch.Tensor:
        if mem is None:
            return self.plain(x)
        return fetched.kind.ffn(self, x, mem, fetched.lora_alpha)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = _layer_norm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = _layer_norm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, rotary, attn_mask, mem, fetched, cache=None, offset=0):
        x = x + self.attn(self.attn_norm(x), rotary, attn_mask, mem, fetched, cache, offset)
        return x + self.ffn(self.ffn_norm(x), mem, fetched)


class KVCache:
    """Keys and values of every layer, for greedy decoding that feeds one new token per step.

    The first call (prefill) runs the whole (left-padded) prompt; later calls take (B, 1) tokens that
    continue the document of each row's last token, at the next position.
    """

    def __init__(self, n_layers: int):
        self.layers: list[dict] = [{} for _ in range(n_layers)]
        self.segments: torch.Tensor | None = None  # (B, L) segment id of every cached position

    @property
    def length(self) -> int:
        return 0 if self.segments is None else self.segments.shape[1]


class Transformer(nn.Module):
    """The anchor: embeddings, blocks, final norm and output head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _layer_norm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # LayerNorm gains
            else:
                nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)
        # scale residual-branch outputs by depth so deeper models start stable (GPT-2 convention)
        for block in self.blocks:
            block.attn.wo.weight.mul_((2 * self.cfg.n_layers) ** -0.5)
            block.ffn.w3.weight.mul_((2 * self.cfg.n_layers) ** -0.5)

    def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None,
                memory: FetchedMemory | None = None, last_n: int | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). segment_ids (B, T): documents in a packed row.

        last_n: only compute the logits of the last n positions (scoring and generation need no more).
        cache: a `KVCache` for incremental decoding (see there).
        """
        return F.linear(self.features(tokens, segment_ids, memory, last_n, cache), self.head_weight)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's (vocab, d_model) weight: the embeddings when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def features(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None,
                 memory: FetchedMemory | None = None, last_n: int | None = None,
                 cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, T or last_n, d_model), before the output head."""
        offset = 0
        if cache is not None and cache.length:
            offset = cache.length
            new_segments = cache.segments[:, -1:].expand(-1, tokens.shape[1])  # continue each row's document
            attn_mask = continuation_attention_mask(cache.segments, new_segments)[:, None]
            cache.segments = torch.cat([cache.segments, new_segments], dim=1)
        else:
            if cache is not None:
                cache.segments = segment_ids if segment_ids is not None else torch.zeros_like(tokens)
            attn_mask = None if segment_ids is None else document_attention_mask(segment_ids)[:, None]
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            mem = memory.for_layer(i) if memory is not None else None
            x = block(x, self.rotary, attn_mask, mem, memory, cache.layers[i] if cache is not None else None,
                      offset)
        return self.norm(x if last_n is None else x[:, -last_n:])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class HierMemLM(nn.Module):
    """Anchor transformer plus an optional hierarchical memory bank.

    forward(tokens, segment_ids, paths, use_generic, blocked) — without paths (or without a bank) it
    is the plain anchor.
    """

    def __init__(self, model_cfg: ModelConfig, memory_cfg: MemoryConfig | None = None):
        super().__init__()
        self.model_cfg, self.memory_cfg = model_cfg, memory_cfg
        self.anchor = Transformer(model_cfg)
        self.bank = MemoryBank(model_cfg, memory_cfg) if memory_cfg is not None and memory_cfg.enabled else None

    def fetch(self, paths: torch.Tensor | None, use_generic: torch.Tensor | None = None,
              blocked: torch.Tensor | None = None, active: dict[int, ActiveRows] | None = None,
              ) -> FetchedMemory | None:
        return None if self.bank is None else self.bank.fetch_for(paths, use_generic, blocked, active)

    def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None,
                paths: torch.Tensor | None = None, use_generic: torch.Tensor | None = None,
                blocked: torch.Tensor | None = None, active: dict[int, ActiveRows] | None = None,
                last_n: int | None = None) -> torch.Tensor:
        memory = self.fetch(paths, use_generic, blocked, active)
        return self.anchor(tokens, segment_ids, memory, last_n=last_n)

    def features(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None,
                 paths: torch.Tensor | None = None, use_generic: torch.Tensor | None = None,
                 blocked: torch.Tensor | None = None, active: dict[int, ActiveRows] | None = None) -> torch.Tensor:
        """`forward` up to the output head: the final hidden states (the fused loss applies the head)."""
        return self.anchor.features(tokens, segment_ids, self.fetch(paths, use_generic, blocked, active))

    @property
    def fast(self) -> bool:
        """Use the fast paths of `hiermem.kernels` (default); False gives the plain path, same results."""
        return self.anchor.rotary.fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self.anchor.rotary.fast = bool(value)
        if self.bank is not None:
            self.bank.fast = bool(value)

    # accounting, nanochat-style: methods on the model, computed from the configs
    def accounting(self, seq_len: int | None = None):
        from hiermem.accounting import count
        return count(self.model_cfg, self.memory_cfg, seq_len=seq_len or self.model_cfg.max_seq_len)

    def num_params(self) -> dict[str, int]:
        """Real tensor sizes: anchor (embeddings + the rest), bank per level and generic."""
        out = {"anchor": self.anchor.num_params(),
               "embedding": self.anchor.embed.weight.numel() + (self.anchor.head.weight.numel()
                                                                 if self.anchor.head is not None else 0)}
        if self.bank is not None:
            for level, p in enumerate(self.bank.levels):
                out[f"bank_level{level + 1}"] = p.numel()
            out["generic"] = sum(p.numel() for p in self.bank.generic)
        return out
