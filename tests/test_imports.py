"""Importing llmapi's public modules imports no Triton: kernel modules are imported where a kernel first runs.
(A kernel module imported early defines its kernels before the tests set TRITON_INTERPRET on a machine without a
GPU, and every interpreted kernel test after it then fails; it also keeps `import llmapi` light.)"""

import subprocess
import sys


def test_importing_llmapi_imports_no_triton():
    code = ("import sys\n"
            "import llmapi, llmapi.models, llmapi.layers.attention, llmapi.layers.linear, llmapi.layers.flash_prefill\n"
            "import llmapi.runtime.model_runner, llmapi.bench, llmapi.bench_hf, llmapi.cli\n"
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", run.stdout[-500:]
