"""`python -m modules.cli ...`: the `unclip` console script (used by torchrun and the demo)."""

import sys

from modules.cli.main import main

sys.exit(main())
