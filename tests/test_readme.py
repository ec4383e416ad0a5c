"""The README's first example is a valid script, and it runs offline with the bundled SmolLM2 GGUF in place of
the hub id."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_ID = '"HuggingFaceTB/SmolLM2-135M-Instruct"'


def _first_python_block() -> str:
    match = re.search(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert match is not None, "README.md has no ```python block"
    return match.group(1)


def test_first_example_compiles_as_a_script():
    compile(_first_python_block(), "README.md", "exec")


@pytest.mark.slow
def test_first_example_runs_with_the_bundled_model(smollm2_gguf, tmp_path):
    code = _first_python_block()
    assert HUB_ID in code
    code = re.sub(r"max_tokens=\d+", "max_tokens=6", code.replace(HUB_ID, repr(str(smollm2_gguf))))
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    # The environment carries the test session's engine cache and HF_HUB_OFFLINE=1 (conftest).
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.strip()]
    # The two greedy completions print words; the streamed story is sampled (unseeded), so its few tokens may be
    # punctuation or newlines only.
    assert len(printed) >= 2 and all(re.search(r"\w", line) for line in printed[:2]), proc.stdout
