"""PEFT LoRA adapters for the tiny models, written by peft itself, and transformers + PEFT as the reference."""

import random

import torch


def make_peft_adapter(model_dir, path, r: int, targets, seed: int, alpha: float = None, use_rslora: bool = False,
                      std: float = 0.2, **lora_kwargs):
    """A PEFT LoRA adapter of the HF model in `model_dir`, saved to `path` with peft's save_pretrained. A and B are
    nonzero and random (PEFT's default B is zero: the adapter would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets),
                        init_lora_weights=False, use_rslora=use_rslora, **lora_kwargs)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
    model.save_pretrained(path, save_embedding_layers=False)  # the adapter only, as a trained one is saved
    return path


def peft_generate(model_dir, adapter, prompts, max_tokens: int):
    """transformers' greedy generate, one prompt at a time, with the adapter (None: the base model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def prompts(vocab: int, lengths, seed: int, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def generate(llm, prompts_, lora_request=None, max_tokens: int = 12, **kwargs):
    from llmapi import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    outs = llm.generate(prompts_, params, use_tqdm=False, lora_request=lora_request, **kwargs)
    return [o.outputs[0].token_ids for o in outs]
