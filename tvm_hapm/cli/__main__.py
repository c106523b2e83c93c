"""``python -m tvm_hapm.cli``: the ``hapm`` command line."""

from . import run

run()
