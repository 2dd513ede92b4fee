"""Document masks of packed sequences, shared by the data packing, the model and the loss.

A packed row holds several documents, each with its segment id (0, 1, 2, ... within the row);
padding has segment id -1 (see `hiermem.data.packing`). Two rules follow from that layout:

- attention stays inside a document and is causal (`document_attention_mask`; for incremental
  decoding against a cache, `continuation_attention_mask`);
- the target of position t is token t+1, and it counts only when `segment_ids[t] == segment_ids[t+1]
  >= 0`: same document, not padding (`loss_mask`).

It imports no other hiermem module, so the model needs nothing from the data package.
"""

from __future__ import annotations

import numpy as np
import torch


def loss_mask(segment_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, T-1) bool: position t predicts token t+1 only inside one document (never padding)."""
    seg = torch.as_tensor(segment_ids)
    return (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] >= 0)


def document_attention_mask(segment_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, T, T) bool, True where query t may attend key s: s <= t and same segment (not padding).
    Padding queries attend to themselves only, so softmax rows are never empty."""
    seg = torch.as_tensor(segment_ids)
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    eye = torch.eye(t, dtype=torch.bool, device=seg.device)
    return (same & causal) | eye


def continuation_attention_mask(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """(B, T, L + T) bool for T new positions that continue the documents of a cache of L positions.

    cached: (B, L) segment ids of the cached positions; new: (B, T) segment ids of the new ones (at
    positions L .. L+T-1). True where the new query may attend: the same segment, causally.
    """
    keys = torch.cat([cached, new], dim=1)
    mask = keys[:, None, :] == new[:, :, None]
    mask &= torch.ones(new.shape[1], keys.shape[1], dtype=torch.bool, device=new.device).tril(
        diagonal=cached.shape[1])
    return mask
