"""Registration with peft: the COMOE type, idempotence, and what loading without the import does."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import comoe_peft
from comoe_peft import CoMoEConfig, CoMoEModel
from comoe_peft.tuner.registration import is_registered, register


def test_import_registers_the_peft_type():
    assert PeftType.COMOE.value == "COMOE"
    assert PeftType("COMOE") is PeftType.COMOE and PeftType["COMOE"] is PeftType.COMOE
    assert "COMOE" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.COMOE] is CoMoEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.COMOE] is CoMoEModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.COMOE] == "comoe_"
    assert is_registered()


def test_registration_is_idempotent_and_survives_reload():
    register()
    register()
    importlib.reload(importlib.import_module("comoe_peft.tuner.peft_type"))
    assert list(PeftType).count(PeftType.COMOE) == 1
    assert is_registered()


def test_plain_string_peft_type_is_understood(tmp_path):
    CoMoEConfig(r=2).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CoMoEConfig) and loaded.r == 2


def test_loading_without_the_import_fails_and_with_it_works(tmp_path):
    CoMoEConfig(r=2).save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        from peft import PeftConfig
        try:
            PeftConfig.from_pretrained({str(tmp_path)!r})
        except KeyError as error:
            print("KeyError", error)
        import comoe_peft
        print(type(PeftConfig.from_pretrained({str(tmp_path)!r})).__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "KeyError 'COMOE'" in out.stdout and "CoMoEConfig" in out.stdout


def test_version_is_exposed():
    assert comoe_peft.__version__
