"""`python -m comoe_peft` runs the `comoe-peft` command."""

import sys

from comoe_peft.experiments.cli import main

sys.exit(main())
