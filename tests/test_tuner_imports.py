"""Imports run downwards: the tuner modules (config, layer, model, bnb, ...) load neither trl nor the main job."""

from __future__ import annotations

import subprocess
import sys

TUNER = ["comoe_peft.config", "comoe_peft.layer", "comoe_peft.model", "comoe_peft.bnb", "comoe_peft.fused_down",
         "comoe_peft.losses", "comoe_peft.registration", "comoe_peft.dora"]
ABOVE = ["trl", "matplotlib", "comoe_peft.trainer", "comoe_peft.cli", "comoe_peft.jobs"]


def test_tuner_modules_do_not_import_trl_or_the_cli():
    code = (f"import sys\nfor m in {TUNER!r}: __import__(m)\n"
            f"print(','.join(m for m in {ABOVE!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "", f"the tuner imported: {out.stdout.strip()}"
