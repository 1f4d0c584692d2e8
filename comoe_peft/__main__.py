"""`python -m comoe_peft` runs the `comoe-peft` command."""

import sys

from .cli import main

sys.exit(main())
