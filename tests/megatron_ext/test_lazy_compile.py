"""megatron-core imported through megatron_ext leaves torch's compiler unimported until a compiled
function is first called, and compiled functions still compile (in a fresh interpreter each)."""

import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_megatron_core_imports_without_the_compiler_and_its_fused_functions_compile_on_first_call():
    out = _run("""
        import sys
        import megatron_ext
        from megatron.core.fusions import fused_bias_swiglu
        import megatron.core.models.gpt
        print("dynamo before call:", "torch._dynamo" in sys.modules)
        import torch
        x = torch.randn(4, 8)
        # megatron-core's jit_fuser'd SwiGLU, compiled (inductor) at this first call
        y = fused_bias_swiglu.swiglu(x)
        a, b = torch.chunk(x, 2, -1)
        print("matches eager:", torch.allclose(y, torch.nn.functional.silu(a) * b, atol=1e-6))
        print("dynamo after call:", "torch._dynamo" in sys.modules)
        print("compiled frames:", torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0)
    """)
    assert "dynamo before call: False" in out
    assert "matches eager: True" in out
    assert "dynamo after call: True" in out and "compiled frames: True" in out


def test_deferred_compile_keeps_torch_compile_semantics():
    out = _run("""
        import torch
        from megatron_ext.lazy_compile import install
        install()

        @torch.compile(backend="eager", fullgraph=True)
        def f(x):
            return x * 2 + 1

        def g(x):
            return torch.sin(x)

        x = torch.randn(3)
        print("decorator with options:", torch.equal(f(x), x * 2 + 1), f.__name__)
        print("plain call:", torch.equal(torch.compile(g, backend="eager")(x), torch.sin(x)))
        lin = torch.nn.Linear(3, 3)
        print("module:", type(torch.compile(lin, backend="eager")).__name__)

        @torch.compile(backend="eager", fullgraph=True)
        def outer(x):
            return f(x) - 1     # a deferred function inside a compiled region is inlined
        print("nested:", torch.equal(outer(x), (x * 2 + 1) - 1))
    """)
    assert "decorator with options: True f" in out
    assert "plain call: True" in out
    assert "module: OptimizedModule" in out
    assert "nested: True" in out
