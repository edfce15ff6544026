"""``python -m unfog.cli``, as the `unfog` command (torchrun uses it)."""

import sys

from . import main

sys.exit(main())
