"""Model inputs shared by generation and scoring: where the model lives, how long its context is, and
left-padded batches (prompts end at the same column, so new tokens follow on directly)."""

from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def max_positions(model) -> int | None:
    cfg = getattr(model.config, "text_config", None) or model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def left_pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` with every row padded on the left to the longest."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
    return input_ids.to(device), mask.to(device)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask: a left-padded row's first real token is position 0, so the
    row scores and continues exactly as it would alone (padding positions are clamped to 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
