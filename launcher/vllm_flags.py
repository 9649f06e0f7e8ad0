"""`vllm serve`'s command line, accepted by `loom` where a flag means what Loom does.

vLLM's spellings of LoRAX flags are second names of those flags (cli.py: `--num-shard`/`--tensor-parallel-size`,
`--max-total-tokens`/`--max-model-len`, `--max-active-adapters`/`--max-loras`, `--hostname`/`--host`), so
`loom --help` shows them side by side. The flags vLLM has and LoRAX does not are added here, in their own help
group, and turned into router settings by `router_settings`. Two are accepted without their vLLM meaning,
saying so in the log: `--gpu-memory-utilization` (Loom sizes the KV cache from the memory left after the
weights: --kv-cache-mb) and `--max-cpu-loras` (Loom's host cache is bounded in bytes: --adapter-host-cache-mb).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("loom")

MAX_CHAT_TEMPLATE_BYTES = 1 << 20  # as an adapter's chat template file (router/adapter_files.py)


class VllmFlagError(ValueError):
    """A vLLM flag whose value Loom cannot use; reported like the launcher's other flag errors."""


def lora_module(text: str) -> tuple[str, str]:
    """`--lora-modules` entry: `name=path`, or vLLM's JSON form {"name": ..., "path": ..., "base_model_name": ...}."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
        name, path = (entry.get("name"), entry.get("path")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(path, str) or not name.strip() or not path.strip():
            raise argparse.ArgumentTypeError(f'expected {{"name": NAME, "path": PATH}}, got {text!r}')
        return name.strip(), path.strip()
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH or JSON, got {text!r}")
    return name.strip(), path.strip()


def origins(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f'expected a JSON list of origins such as \'["https://app.example"]\', '
                                         f"got {text!r}")
    return value


def add_vllm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM's serving flags (vllm serve), beside the LoRAX names above")
    g.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="The model as vllm serve takes it: same as --model-id.")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="The base model's id in /v1/models, responses and metric labels (default: --model-id). "
                   "One name.")
    g.add_argument("--lora-modules", type=lora_module, nargs="+", action="extend", default=[],
                   metavar="NAME=PATH", help="Same as --adapter NAME=SOURCE; vLLM's JSON form "
                   '{"name": ..., "path": ...} too.')
    g.add_argument("--enable-lora", action="store_true",
                   help="Accepted: adapters are always on.")
    g.add_argument("--max-lora-rank", type=int, default=None, metavar="N",
                   help="Adapters of a larger rank are refused (400).")
    g.add_argument("--max-cpu-loras", type=int, default=None, metavar="N",
                   help="Accepted, not applied: the host cache of paged-out adapters is bounded in bytes "
                   "(--adapter-host-cache-mb).")
    g.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="Accepted, not applied: the KV cache takes --kv-cache-mb, by default 90%% of the GPU "
                   "memory free after the weights.")
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="The base model's chat template, a file or the template itself (replaces the model's).")
    g.add_argument("--uds", default=None, metavar="PATH",
                   help="Listen on this Unix domain socket instead of --hostname/--port.")
    g.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="Serve HTTPS with this private key ...")
    g.add_argument("--ssl-certfile", default=None, metavar="FILE", help="... and this certificate chain.")
    g.add_argument("--allowed-origins", type=origins, default=None, metavar="JSON",
                   help='CORS: origins browsers may call from, a JSON list (["*"] for any). Default: none.')


def merge_model(args: argparse.Namespace) -> None:
    """The positional MODEL into --model-id (the two may not disagree)."""
    if args.model is not None:
        if args.model_id is not None and args.model_id != args.model:
            raise VllmFlagError(f"the model is given twice: {args.model!r} and --model-id {args.model_id!r}")
        args.model_id = args.model


def router_settings(args: argparse.Namespace) -> dict:
    """The RouterConfig fields vLLM's flags set; logs the flags accepted without their vLLM meaning."""
    names = args.served_model_name or []
    if len(names) > 1:
        raise VllmFlagError("--served-model-name: Loom serves the base model under one name")
    if args.max_lora_rank is not None and args.max_lora_rank < 1:
        raise VllmFlagError(f"--max-lora-rank must be a positive integer, got {args.max_lora_rank}")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise VllmFlagError("--ssl-keyfile and --ssl-certfile go together")
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path and not Path(path).is_file():
            raise VllmFlagError(f"{flag} {path!r} is not a file")
    if args.gpu_memory_utilization is not None:
        log.warning("--gpu-memory-utilization is not applied: the KV cache takes --kv-cache-mb (default: 90%% of "
                    "the GPU memory free after the weights)")
    if args.max_cpu_loras is not None:
        log.warning("--max-cpu-loras is not applied: the host cache is bounded by --adapter-host-cache-mb")
    return {"served_model_name": names[0] if names else None, "max_lora_rank": args.max_lora_rank or 0,
            "chat_template": read_chat_template(args.chat_template), "uds": args.uds,
            "ssl_keyfile": _absolute(args.ssl_keyfile), "ssl_certfile": _absolute(args.ssl_certfile),
            "allowed_origins": args.allowed_origins or []}


def read_chat_template(value: str | None) -> str | None:
    """`--chat-template`: the file's text when it names a file, else the value itself (vLLM reads it so)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # a template too long to be a path
        is_file = False
    if is_file:
        if path.stat().st_size > MAX_CHAT_TEMPLATE_BYTES:
            raise VllmFlagError(f"--chat-template {value!r} is larger than {MAX_CHAT_TEMPLATE_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise VllmFlagError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None
