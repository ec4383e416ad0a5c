"""The installed package names the kernels `llmapi._kernels` (pyproject maps `_kernels/` there): a bare
`_kernels` import works only from a source checkout, and breaks an installed llmapi."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_module_imports_the_kernels_by_their_source_name():
    bad = []
    for path in [p for d in ("llmapi", "_kernels", "tests", "examples") for p in sorted((ROOT / d).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "_kernels"]
    assert bad == []
