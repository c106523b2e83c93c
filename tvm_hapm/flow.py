"""``tvm_hapm.flow``: the public name of :mod:`tvm_hapm.compress.flow` (the same module object,
so attributes set on one are seen on the other)."""

import sys

from .compress import flow

sys.modules[__name__] = flow
