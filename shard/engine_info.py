"""What an engine tells the router about itself and about an adapter it registered."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.models import head_dim_of


@dataclass(slots=True)
class EngineInfo:
    model_type: str
    dtype: str
    device: str
    vocab_size: int
    max_position_embeddings: int
    block_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    rank: int
    world_size: int

    @classmethod
    def describe(cls, config, model, dtype: torch.dtype, device: torch.device, block_size: int, tp_rank: int,
                 tp_size: int) -> "EngineInfo":
        return cls(model_type=config.model_type, dtype=str(dtype).removeprefix("torch."), device=str(device),
                   vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
                   block_size=block_size, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                   head_dim=head_dim_of(config), sliding_window=model.sliding_window, rank=tp_rank,
                   world_size=tp_size)


@dataclass(slots=True)
class AdapterInfo:
    rank: int
    pages: int  # adapter pool pages it occupies while resident
    vocab_size: int  # the vocabulary of its requests (the model's unless it brings its own)
