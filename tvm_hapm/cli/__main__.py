"""``python -m tvm_hapm.cli``: the ``hapm`` command line."""

import sys

from . import main

sys.exit(main())
