"""The bench's transformers baseline: the same workload through generate() with a static cache and torch.compile."""

from __future__ import annotations

import gc
import time

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(model_dir: str, load_format: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    if load_format == "dummy":
        with torch.device(device):
            model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


WARMUP_TOKENS = 4
"""The untimed first generate stops after this many new tokens: its static cache is sized for the whole output (the
timed run's shapes), and the compile happens at its first decode step; the rest of a long output would only
repeat the timed run's work."""


def _timed_generate(model, ids: torch.Tensor, new_tokens: int, compile: bool, stop_after: int | None = None
                    ) -> float:
    """Seconds of one generate of `new_tokens` tokens per row (all of them: EOS off); with `stop_after`, the same
    generate stopped after that many (the warm-up)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = input_ids.shape[1] - start_len >= stop_after
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              cache_implementation="static", disable_compile=not compile,
                              pad_token_id=0, eos_token_id=None)
    # An encoder-decoder model's output is the decoder start token and the new tokens.
    start_len = 1 if model.config.is_encoder_decoder else ids.shape[1]
    stopping = StoppingCriteriaList([StopAfter()] if stop_after else [])
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, generation_config=config, attention_mask=torch.ones_like(ids),
                         stopping_criteria=stopping)
    if ids.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    want = start_len + (min(stop_after, new_tokens) if stop_after else new_tokens)
    assert out.shape[1] == want, f"transformers gave {out.shape[1] - start_len} new tokens, not {want - start_len}"
    return elapsed


def run_hf_best(model_dir: str, load_format: str, dtype_name: str, device: str, workload, batch_sizes: list[int],
                compile: bool = True) -> dict:
    """run_hf at each of `batch_sizes`: the fastest run's result, with "runs" (every batch size's output tok/s,
    or the error of one that did not fit: out of device memory)."""
    import torch

    runs, best = [], None
    for batch in batch_sizes:
        try:
            r = run_hf(model_dir, load_format, dtype_name, device, workload, batch, compile=compile)
        except torch.OutOfMemoryError as e:
            runs.append({"batch_size": batch, "error": f"out of memory: {str(e).splitlines()[0][:160]}"})
            continue  # run_hf frees the device's cache before the next batch size
        runs.append({"batch_size": batch, "output_tok_s": r["output_tok_s"]})
        if best is None or r["output_tok_s"] > best["output_tok_s"]:
            best = r
    if best is None:
        raise RuntimeError(f"transformers ran out of memory at every batch size tried: {batch_sizes}")
    return {**best, "runs": runs}


def run_hf(model_dir: str, load_format: str, dtype_name: str, device: str, workload, batch_size: int,
           compile: bool = True, timed_batches: int = 1) -> dict:
    """Output tok/s of transformers' generate at `batch_size` (a first generate, which compiles, is not timed:
    it stops after WARMUP_TOKENS tokens).

    TPOT is (time of the whole generate - time of a one-token generate) / (osl - 1) at the same batch.
    """
    gc.collect()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    model = _load(model_dir, load_format, _DTYPES[dtype_name], dev)
    prompts = workload.prompts(model.config.vocab_size)  # an encoder-decoder model's encoder inputs
    ids = torch.tensor(prompts[:batch_size], device=dev)  # [B, isl]
    if ids.shape[0] < batch_size:  # fewer requests than the batch: repeat them
        ids = ids.repeat(-(-batch_size // ids.shape[0]), 1)[:batch_size]
    with torch.inference_mode():
        _timed_generate(model, ids, workload.osl, compile, stop_after=WARMUP_TOKENS)  # warm-up: compiles
        full = [_timed_generate(model, ids, workload.osl, compile) for _ in range(timed_batches)]
        first = [_timed_generate(model, ids, 1, compile) for _ in range(timed_batches)]
    wall, prefill = float(np.median(full)), float(np.median(first))
    del model
    gc.collect()
    return {"batch_size": batch_size, "output_tok_s": batch_size * workload.osl / wall, "wall_s": wall,
            "ttft_ms_p50": 1e3 * prefill,
            "tpot_ms_p50": 1e3 * (wall - prefill) / max(1, workload.osl - 1), "compiled": compile}
