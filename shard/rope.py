"""Rotary position embeddings exactly as the installed transformers computes them, for both checkpoint eras.

transformers' config classes read a config.json of either era into one `rope_parameters` form: older
checkpoints carry a top-level `rope_theta` and `rope_scaling`, newer ones `rope_parameters`, and families
with several attention kinds (Gemma 3) key it by layer type. inv_freq and the attention scaling come from
transformers' own init functions. A rope_type this module does not know is a start-up error naming the
field, never a silent fallback to the default rope.

Two types depend on the sequence length. `dynamic` grows its base only past max_position_embeddings, a
length the router never admits, so it is the init value here. `longrope` switches from its short to its long
factors once the sequence is longer than original_max_position_embeddings; transformers decides that per
forward from the longest position in it, so a prompt's tokens follow the prompt's length and each decoded
token its own position + 1 (the `lengths` given to `forward`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from shard.kernels import cpu

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


class RopeConfigError(ValueError):
    """The checkpoint's rope configuration is not one Loom computes exactly."""


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The standardised rope parameters of `config` (of one layer type when they are keyed by layer type)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        raise RopeConfigError("config has no rope_parameters (or rope_theta): cannot compute rotary embeddings")
    if layer_type is not None and layer_type in params:
        return params[layer_type]
    if "rope_type" not in params and "rope_theta" not in params:
        raise RopeConfigError(f"rope_parameters are keyed by layer type {sorted(params)}; "
                              f"layer type {layer_type!r} has none")
    return params


def _init_kwargs(config, layer_type: str | None) -> dict:
    # Only configs keyed by layer type take layer_type: the others would look it up and fail.
    params = getattr(config, "rope_parameters", None) or {}
    return {"layer_type": layer_type} if layer_type is not None and layer_type in params else {}


def _default_inv_freq(params: dict, head_dim: int, device) -> torch.Tensor:
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


class RotaryEmbedding(nn.Module):
    """cos/sin for a step's positions, computed once per forward and shared by the layers of one layer type.

    `rotary_dim` may be less than head_dim (partial rotary): only the first rotary_dim features rotate, for
    families whose transformers implementation does that (`partial_rotary=True`). The Llama family's
    ignores partial_rotary_factor for the default rope and fails for the scaled ones, so there a factor
    below 1 is a start-up error rather than a guess.
    """

    def __init__(self, config, head_dim: int, device: torch.device | str, layer_type: str | None = None,
                 partial_rotary: bool = False):
        super().__init__()
        device = torch.device(device)
        params = rope_parameters(config, layer_type)
        rope_type = params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise RopeConfigError(f"rope_type {rope_type!r} (config.json rope_parameters, or rope_scaling in older "
                                  f"checkpoints) is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        factor = params.get("partial_rotary_factor", 1.0)
        if factor != 1.0 and not partial_rotary:
            raise RopeConfigError(f"partial_rotary_factor {factor} is not supported for model_type "
                                  f"{config.model_type!r}: transformers rotates the whole head there")
        kwargs = _init_kwargs(config, layer_type)
        if rope_type == "default":
            inv_freq, self.attention_scaling = _default_inv_freq(params, head_dim, device), 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, **kwargs)
        self.rotary_dim = inv_freq.numel() * 2
        if self.rotary_dim > head_dim:
            raise RopeConfigError(f"rotary dimension {self.rotary_dim} exceeds head_dim {head_dim}")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.long_after: int | None = None  # longrope: lengths past this use long_inv_freq
        if rope_type == "longrope":
            self.long_after = int(params["original_max_position_embeddings"])
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=self.long_after + 1, **kwargs)
            self.register_buffer("long_inv_freq", long_inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor, lengths: torch.Tensor | None, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions, lengths: [T] (lengths: the length transformers would see for each token's forward;
        read only by longrope) -> cos, sin [T, 1, rotary_dim]."""
        inv_freq = self.inv_freq
        if self.long_after is not None:
            inv_freq = torch.where((lengths > self.long_after)[:, None], self.long_inv_freq, self.inv_freq)
        freqs = positions.float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        # [T, 1, rotary_dim]: broadcasts over the heads of [T, heads, head_dim].
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first cos.shape[-1] features of x [T, heads, head_dim] (transformers' rotate_half form)."""
    heads_contiguous = x.stride(2) == 1 and x.stride(1) == x.shape[2]
    if cpu.runs_on(x) and heads_contiguous and cos.is_contiguous() and sin.is_contiguous():
        return cpu.rotary(x, cos, sin)
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    half = rotary_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
