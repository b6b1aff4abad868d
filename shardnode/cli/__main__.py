"""`python -m shardnode.cli ...`: the same as the `shardnode` console script."""

import sys

from .main import main

sys.exit(main())
