"""`python -m node ...` is `potluck ...`."""

import sys

from node.cli import main

sys.exit(main())
