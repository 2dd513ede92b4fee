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
