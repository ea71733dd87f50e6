"""``python -m privdiff``: the same command line as ``privdiff``."""

import sys

from .cli import main

sys.exit(main())
