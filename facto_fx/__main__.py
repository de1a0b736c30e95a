"""python -m facto_fx: the facto-fx command."""

import sys

from facto_fx.cli import main

sys.exit(main())
