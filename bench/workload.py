"""Workloads: S-LoRA's (Poisson/Gamma arrivals, power-law adapter popularity, uniform lengths) and Punica's
adapter distributions (identical, distinct, uniform, skewed), plus the random model and adapters they run on.

A workload is a fixed list of BenchRequest, so that every system (Loom over HTTP, the engine in-process, the
PEFT baseline) serves exactly the same prompts, lengths, adapters and arrival times.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

DISTRIBUTIONS = ("base", "identical", "distinct", "uniform", "skewed")


@dataclass(slots=True)
class BenchRequest:
    arrival: float  # seconds after the run starts
    input_ids: list[int]
    text: str  # what the HTTP client sends; the model's tokenizer encodes it to exactly input_ids
    output_len: int
    adapter: int  # index into the adapter pool; -1 = base model


@dataclass(slots=True)
class WorkloadSpec:
    num_requests: int = 64
    num_adapters: int = 16
    distribution: str = "distinct"  # one of DISTRIBUTIONS
    alpha: float = 1.0  # power-law exponent of adapter popularity ("skewed")
    rate: float = 64.0  # mean arrivals per second; 0 = all at once
    cv: float = 1.0  # coefficient of variation of inter-arrival gaps: 1 = Poisson, else Gamma
    input_len: tuple[int, int] = (16, 64)
    output_len: tuple[int, int] = (32, 32)
    seed: int = 0


def arrivals(n: int, rate: float, cv: float, rng: random.Random) -> list[float]:
    """Gamma-distributed gaps with mean 1/rate and the given CV (shape 1/cv²; cv=1 is Poisson)."""
    if rate <= 0:
        return [0.0] * n
    shape = 1.0 / (cv * cv)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(shape, 1.0 / (shape * rate))
    return out


def adapter_choices(spec: WorkloadSpec, rng: random.Random) -> list[int]:
    n, pool = spec.num_requests, spec.num_adapters
    match spec.distribution:
        case "base":
            return [-1] * n
        case "identical":
            return [0] * n
        case "distinct":  # round-robin: any window of `pool` consecutive requests uses `pool` adapters
            return [i % pool for i in range(n)]
        case "uniform":
            return [rng.randrange(pool) for _ in range(n)]
        case "skewed":  # S-LoRA's power law: popularity of the k-th adapter ∝ k^-alpha
            weights = [(k + 1) ** -spec.alpha for k in range(pool)]
            return rng.choices(range(pool), weights, k=n)
    raise ValueError(f"unknown distribution {spec.distribution!r}; expected one of {DISTRIBUTIONS}")


def prompt(tokenizer, length: int, rng: random.Random, words: list[str]) -> tuple[str, list[int]]:
    """Random words until the prompt is at least `length` tokens (a few over at most)."""
    picked: list[str] = []
    ids: list[int] = []
    while len(ids) < length:
        picked.append(rng.choice(words))
        ids = tokenizer(" ".join(picked))["input_ids"]
    text = " ".join(picked)
    return text, ids


def make_requests(spec: WorkloadSpec, tokenizer) -> list[BenchRequest]:
    from launcher.tiny_model import CORPUS

    rng = random.Random(spec.seed)
    words = " ".join(CORPUS).split()
    times = arrivals(spec.num_requests, spec.rate, spec.cv, rng)
    adapters = adapter_choices(spec, rng)
    out = []
    for t, adapter in zip(times, adapters):
        text, ids = prompt(tokenizer, rng.randint(*spec.input_len), rng, words)
        out.append(BenchRequest(t, ids, text, rng.randint(*spec.output_len), adapter))
    return out


# ---- the model and adapters ------------------------------------------------------------------------------


@dataclass(slots=True)
class ModelSpec:
    hidden_size: int = 512
    num_hidden_layers: int = 6
    intermediate_size: int = 1376
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    rank: int = 16
    max_position_embeddings: int = 1024

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def build_model(root: Path, spec: ModelSpec) -> Path:
    """The random Llama, built once per spec under `root` and reused."""
    from launcher.tiny_model import build_tiny_model

    path = root / f"llama-{spec.key()}"
    if not (path / "config.json").is_file():
        build_tiny_model(path.with_suffix(".tmp"), "llama", hidden_size=spec.hidden_size,
                         num_hidden_layers=spec.num_hidden_layers, intermediate_size=spec.intermediate_size,
                         num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                         max_position_embeddings=spec.max_position_embeddings)
        path.with_suffix(".tmp").rename(path)
    return path


def build_adapters(model_dir: Path, spec: ModelSpec, count: int) -> list[Path]:
    """`count` rank-`spec.rank` adapters on all 7 projections, in PEFT's format. The first is written by peft
    itself (build_tiny_adapter); the rest copy its config and tensor names with their own random weights, which
    is the same file format at a fraction of the cost of loading the base model once per adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    from launcher.tiny_model import build_tiny_adapter

    root = model_dir.parent / f"{model_dir.name}-adapters-r{spec.rank}"
    first = root / "a0000"
    if not (first / "adapter_model.safetensors").is_file():
        build_tiny_adapter(first, model_dir, rank=spec.rank, alpha=2 * spec.rank, target_modules="all-linear",
                           init_scale=0.02)
    template = load_file(first / "adapter_model.safetensors")
    config = (first / "adapter_config.json").read_text()
    paths = [first]
    for i in range(1, count):
        path = root / f"a{i:04d}"
        paths.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(i)
        tensors = {k: (torch.randn(v.shape, generator=gen) * (0.02 if "lora_B" in k else v.std().item()))
                   for k, v in template.items()}
        tmp = path.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "adapter_config.json").write_text(config)
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        tmp.rename(path)
    return paths
