"""Quality evaluation of an engine: perplexity over a text and ROUGE of summaries, beside transformers."""

from .aclsum_data import SummarySample, load_aclsum
from .perplexity import PerplexityResult, default_text_path, engine_perplexity, hf_perplexity, read_text
from .reference import load_hf_reference
from .rouge import ROUGE_TYPES, rouge_scores
from .summarize import Summaries, engine_summaries, hf_summaries, prompt_ids
from .windows import Window, plan_windows

__all__ = ["SummarySample", "load_aclsum", "PerplexityResult", "default_text_path", "engine_perplexity",
           "hf_perplexity", "read_text", "load_hf_reference", "ROUGE_TYPES", "rouge_scores", "Summaries",
           "engine_summaries", "hf_summaries", "prompt_ids", "Window", "plan_windows"]
