"""`python -m paser` (and `accelerate launch -m paser`) run the CLI."""

import sys

from paser.cli import main

sys.exit(main())
