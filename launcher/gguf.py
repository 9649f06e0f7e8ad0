"""GGUF checkpoints (llama.cpp's one-file format), dequantized once into a plain safetensors model dir.

transformers reads the GGUF (config, tokenizer with the chat template from the file's metadata, weights
dequantized); this module writes what it read as a normal model dir, which the shards and the router then
load like any other. The launcher keeps that dir in the Loom user cache (`launcher.model_source`), named
by `cache_name`, so a later start with the same file reuses it and a changed file is converted again.

The weights are stored in float32, what transformers dequantizes to: exact for every GGUF type, where
bfloat16 would round Q8_0 and F16 values. The shards cast them to `--dtype` when they load them; the cost
is disk, 4 bytes a parameter (0.54 GB for a 135M model, 28 GB for a 7B one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("loom")

SUFFIX = ".gguf"
# Written into each converted dir: the file it came from, so that a newer conversion replaces it.
SOURCE_RECORD = "loom-gguf-source.json"
# llama.cpp stops generating at any of these ("end of generation"); the converted model stops at all of them.
EOG_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class GGUFError(Exception):
    """The file cannot be served; the message is the one line the user sees."""


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == SUFFIX


def cache_name(gguf_file: Path) -> str:
    """`<stem>-<digest>` of the file's identity (absolute path, size, mtime): rewriting the file changes it."""
    stat = gguf_file.stat()
    identity = f"{gguf_file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return f"{gguf_file.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def convert(gguf_file: Path, out_dir: Path) -> None:
    """Writes config.json, generation_config.json, model.safetensors (float32) and the tokenizer files with
    the GGUF's chat template into `out_dir`. Raises GGUFError, naming the file, for anything it cannot serve."""
    started = time.monotonic()
    metadata = read_metadata(gguf_file)
    log.info(f"converting {gguf_file.name} ({metadata['general.architecture']}) to a float32 safetensors model "
             f"in the Loom cache; this happens once per file")
    try:
        _convert(gguf_file, out_dir, metadata)
    except GGUFError:
        raise
    except Exception as e:  # transformers' GGUF support rejects a malformed file with assorted exceptions
        raise GGUFError(f"{gguf_file}: cannot convert it: {type(e).__name__}: {e}".splitlines()[0]) from None
    log.info(f"converted {gguf_file.name} in {time.monotonic() - started:.0f} s")


def prune_superseded(converted: Path) -> None:
    """Removes the conversions of the same file made before it changed (they can be large)."""
    source = json.loads((converted / SOURCE_RECORD).read_text())["file"]
    for record in converted.parent.glob(f"*/{SOURCE_RECORD}"):
        try:
            superseded = record.parent != converted and json.loads(record.read_text()).get("file") == source
        except (OSError, ValueError):  # being removed by another launch meanwhile
            continue
        if superseded:
            shutil.rmtree(record.parent, ignore_errors=True)


def read_metadata(gguf_file: Path) -> dict:
    """The header fields the converter checks: the architecture and the end-of-generation token ids."""
    from gguf import GGUFReader

    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from shard.models import MODELS

    # llama.cpp's architecture names for the families Loom serves are transformers' model types (Mistral
    # checkpoints are written as "llama"); transformers must be able to read the architecture too.
    supported = sorted(set(MODELS) & set(GGUF_SUPPORTED_ARCHITECTURES))
    try:
        fields = GGUFReader(gguf_file).fields
        metadata = {key: fields[key].contents() for key in ("general.architecture", *EOG_KEYS) if key in fields}
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise GGUFError(f"{gguf_file}: not a readable GGUF file ({e})") from None
    arch = metadata.get("general.architecture")
    if arch not in supported:
        raise GGUFError(f"{gguf_file}: GGUF architecture {arch!r} is not served by Loom "
                        f"(supported: {', '.join(supported)})")
    return metadata


def _convert(gguf_file: Path, out_dir: Path, metadata: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where, name = gguf_file.parent, gguf_file.name
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    # dequantize=True: plain dense weights whatever kernels are installed; transformers then drops the
    # quantization config, so save_pretrained writes an ordinary checkpoint.
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    eog = sorted({metadata[key] for key in EOG_KEYS if key in metadata})
    if eog:
        model.generation_config.eos_token_id = eog[0] if len(eog) == 1 else eog
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stat = gguf_file.stat()
    record = {"file": str(gguf_file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (out_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")

