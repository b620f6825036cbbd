"""Start processes without importing torch's compiler: ``torch.compile`` of a function, deferred to its
first call.

megatron-core decorates about fifty functions with ``torch.compile`` while its modules load
(``megatron.core.jit.jit_fuser``). Each decoration imports torch._dynamo and inductor, which costs every
process that imports megatron-core 2.3 s of its start (dev box: ``import megatron.core.tensor_parallel,
megatron.core.models.gpt`` 6.5 s, 4.2 s with the compiler not imported), although CPU runs never call
those functions and GPU runs compile each on its first call anyway. Every stage, benchmark and test
process pays it.

:func:`install` makes ``torch.compile`` of a plain function return a wrapper that calls the real
``torch.compile`` on first use; modules (``torch.compile(model)``) and every other use go straight to
torch. It is installed by ``import megatron_ext`` through an import hook that fires only when
megatron-core is first imported, so processes that never import megatron-core (the launcher) do not
import torch for it.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import types

_INSTALLED = False


def _deferred(compile_fn, fn, kwargs: dict):
    """``fn`` compiled by ``compile_fn(fn, **kwargs)`` at its first call (eager while dynamo traces
    an enclosing compiled region, which inlines it as it would inline the compiled function)."""
    import torch

    compiled = None

    @functools.wraps(fn)
    def call(*args, **kw):
        nonlocal compiled
        if torch.compiler.is_compiling():
            return fn(*args, **kw)
        if compiled is None:
            compiled = compile_fn(fn, **kwargs)
        return compiled(*args, **kw)

    return call


def install() -> None:
    """Replace ``torch.compile`` by its deferring version (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    import torch

    real = torch.compile

    @functools.wraps(real)
    def compile(model=None, **kwargs):
        if model is None:   # @torch.compile(...) with options: a decorator
            return lambda fn: compile(fn, **kwargs)
        if isinstance(model, types.FunctionType):
            return _deferred(real, model, kwargs)
        return real(model, **kwargs)

    torch.compile = compile
    _INSTALLED = True


class _BeforeMegatronCore(importlib.abc.MetaPathFinder):
    """Installs the deferring ``torch.compile`` just before ``megatron.core`` is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "megatron.core" and not _INSTALLED:
            install()   # (stays in sys.meta_path: removing it while the import system walks the list
        return None     # would skip the next finder); the regular finders import megatron.core


def install_before_megatron_core() -> None:
    """:func:`install` once megatron-core is about to be imported (nothing if it already was)."""
    if "megatron.core" in sys.modules:
        return
    if not any(isinstance(f, _BeforeMegatronCore) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMegatronCore())
