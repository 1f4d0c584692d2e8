"""`python -m comoe_peft` runs the `comoe-peft` command."""

import sys

from comoe_peft_launcher import main

sys.exit(main())
