"""Checks shared by CPU and GPU tests (importable: pytest puts tests/ on sys.path)."""

import torch


def assert_cached_decoding_matches_recompute(model, tokens, segments, fetched, steps=3, rtol=1e-5, atol=1e-5):
    """Greedy-decode `steps` tokens with the KV cache and compare each step's logits with a full recompute."""
    from hiermem.model import KVCache
    cache = KVCache(model.model_cfg.n_layers)
    with torch.no_grad():
        logits = model.anchor(tokens, segments, fetched, last_n=1, cache=cache)
        full_tokens, full_segments = tokens, segments
        for _ in range(steps):
            step = logits[:, -1].argmax(-1)[:, None]
            full_tokens = torch.cat([full_tokens, step], dim=1)
            full_segments = torch.cat([full_segments, full_segments[:, -1:]], dim=1)
            logits = model.anchor(step, None, fetched, last_n=1, cache=cache)
            reference = model.anchor(full_tokens, full_segments, fetched, last_n=1)
            torch.testing.assert_close(logits, reference, rtol=rtol, atol=atol)


def reference_lr_schedule(total_steps, warmup_steps, peak, final):
    """Learning rate at every step from torch's own schedulers, driven step by step: LinearLR for the
    warmup (peak * (s + 1) / warmup), then CosineAnnealingLR from peak to `final` over the rest.
    An implementation independent of `hiermem.stepper.cosine_lr`, to check it against."""
    out = []
    param = torch.nn.Parameter(torch.zeros(1))
    if warmup_steps > 0:
        opt = torch.optim.SGD([param], lr=peak)
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup_steps, end_factor=1.0,
                                                 total_iters=max(warmup_steps - 1, 1))
        for _ in range(warmup_steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()  # no gradient: a no-op, in the order torch expects
            warm.step()
    opt = torch.optim.SGD([param], lr=peak)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps - warmup_steps), eta_min=final)
    for _ in range(total_steps - warmup_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    return out


def saved_hf_base(folder, config, vocab: int, seq_len: int, seed: int = 0):
    """A tiny random Hugging Face causal LM from `config` (a transformers config object) with the data's
    vocabulary and context, saved as a local model directory (config.json + weights); returns the folder."""
    import transformers
    config.vocab_size = vocab
    for name in ("max_position_embeddings", "n_positions"):
        if hasattr(config, name):
            setattr(config, name, seq_len)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def small_memory_model(kind: str, seed: int = 0):
    """A 2-layer model with a memory of `kind` on a 3-ary tree of depth 2 and a generic block, the bank
    filled with N(0, 0.1) so the memory changes the outputs and gets gradients everywhere; and a
    `packed_batch` for it. Shared by the fast-path and precision tests."""
    from hiermem.config import MemoryConfig, ModelConfig
    from hiermem.model import HierMemLM
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, head_dim=16, ffn_dim=64, vocab_size=97, max_seq_len=24)
    units = {"ffn": (3, 2), "lora-ffn": (2, 1), "lora-qk": (2, 2), "lora-vo": (2, 2), "kv": (4, 2)}[kind]
    torch.manual_seed(seed)
    model = HierMemLM(cfg, MemoryConfig(type=kind, multipliers=units, branching=3, generic=True))
    with torch.no_grad():
        for p in list(model.bank.levels) + list(model.bank.generic):
            p.normal_(0, 0.1)
    return model


def packed_batch(vocab_size: int = 97, seed: int = 0, batch: int = 6, t: int = 24):
    """tokens, segment ids (several documents per row, padding at the end of row 0) and 2-level paths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, t), generator=g)
    segments = torch.cumsum((torch.rand(batch, t, generator=g) < 0.15).long(), dim=1)
    segments[0, -5:] = -1  # padding at the end of a row
    paths = torch.randint(0, 3, (batch, 2), generator=g)
    return tokens, segments, paths
