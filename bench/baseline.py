"""The baseline: transformers + PEFT serving the workload one request at a time, in arrival order.

Every adapter the workload uses is loaded into one PeftModel up front and each request picks its own with
set_adapter (base requests run under disable_adapter): the fair baseline, with no adapter loading on the
request path. Greedy, EOS ignored, exactly output_len tokens per request, as Loom serves them.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.stats import Timing
from bench.workload import BenchRequest


class _Stamps:
    """A generate() streamer that only records when each new token comes out (the first put is the prompt)."""

    def __init__(self, sent: float):
        self.sent, self.times, self._prompt_seen = sent, [], False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter() - self.sent)
        self._prompt_seen = True

    def end(self) -> None:
        pass


def load_peft(model_dir: Path, adapters: list[Path], used: set[int]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    order = sorted(used)
    if not order:
        return base.eval()
    model = PeftModel.from_pretrained(base, adapters[order[0]], adapter_name=f"a{order[0]}")
    for i in order[1:]:
        model.load_adapter(adapters[i], adapter_name=f"a{i}")
    return model.eval()


def run_peft(model, requests: list[BenchRequest]) -> tuple[list[Timing], float]:
    import contextlib

    import torch

    timings: dict[int, Timing] = {}
    start = time.perf_counter()
    for i, req in sorted(enumerate(requests), key=lambda p: p[1].arrival):
        time.sleep(max(0.0, start + req.arrival - time.perf_counter()))
        if req.adapter >= 0:
            model.set_adapter(f"a{req.adapter}")
            context = contextlib.nullcontext()
        else:
            context = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        stamps = _Stamps(start + req.arrival)
        ids = torch.tensor([req.input_ids])
        with torch.inference_mode(), context:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.output_len,
                           min_new_tokens=req.output_len, do_sample=False, streamer=stamps,
                           pad_token_id=model.generation_config.pad_token_id)
        if len(stamps.times) != req.output_len:
            raise RuntimeError(f"PEFT produced {len(stamps.times)} tokens, expected {req.output_len}")
        timings[i] = Timing(req.arrival, stamps.times)
    return [timings[i] for i in range(len(requests))], time.perf_counter() - start
