"""Stop points inside engine calls, so that running work can be stopped (time limit, cancellation, drain).

The denoising loop's callback runs between engine steps, but one UNet pass at a large size can take minutes.
The torch backend therefore also calls `check()` before every ResNet and attention block. What `check` does is
set per thread by whoever runs the request (the server's worker thread): the modules are shared by all threads,
the check is not, hence threading.local. With no check set (CLI, benchmarks, training) it does nothing.
Graph backends (ONNX Runtime, TensorRT) run a whole graph per call and stop only between steps.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

from torch import nn

BLOCKS = ("ResnetBlock2D", "Attention")  # diffusers' heavy blocks, in the UNets and the VAE alike
_local = threading.local()


@contextmanager
def checking(fn: Callable[[], None]):
    """Run `fn` at every stop point reached by this thread inside the block; `fn` raises to stop the work."""
    previous = getattr(_local, "fn", None)
    _local.fn = fn
    try:
        yield
    finally:
        _local.fn = previous


def check() -> None:
    fn = getattr(_local, "fn", None)
    if fn is not None:
        fn()


def _pre_hook(module, args) -> None:
    check()


def install(module: nn.Module) -> int:
    """A stop point before every block of `module` (once per block, however often it is installed); returns how
    many blocks have one now."""
    n = 0
    for m in module.modules():
        if type(m).__name__ in BLOCKS:
            if not getattr(m, "_irece_checkpoint", False):
                m.register_forward_pre_hook(_pre_hook)
                m._irece_checkpoint = True
            n += 1
    return n
