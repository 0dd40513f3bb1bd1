"""`python -m stmoe.cli COMMAND ...`: the same as the `stmoe` script."""

import sys

from stmoe.cli import main

sys.exit(main())
