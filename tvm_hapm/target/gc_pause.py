"""Code generation with CPython's cyclic garbage collector paused.

Compiling a network for hapm_fpga builds about a million small objects that live until the
compile ends: the instructions of every program (ResNet-18: 277,330) and what each stream pass
builds from them.  CPython's cyclic collector runs a pass over young objects every 700
allocations and over *every* tracked object whenever the survivors have grown by a quarter, so
it scans the growing list of instructions again and again: on ResNet-18 that was a sixth to
two-fifths of the offload passes, depending on the load of the machine.  Code generation makes
almost no reference cycles (about 3,000 cyclic objects over that compile, collected at the
first collection after the pause), so pausing the collector frees no memory later than
needed; reference counting still frees everything else at once.
"""

from __future__ import annotations

import contextlib
import gc

__all__ = ["paused_gc"]


@contextlib.contextmanager
def paused_gc():
    """Pause the cyclic garbage collector for a block (or, as a decorator, a call).

    The collector's previous state is restored on exit, also on an exception; nested pauses
    leave it off until the outermost one ends, and a collector that was already off stays off.

    Examples
    --------
    >>> with paused_gc():
    ...     pass
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
