"""Registers CoMoE with peft through its public `register_peft_method` (no patching of peft code paths)."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import CoMoEConfig
from .model import CoMoEModel
from .peft_type import COMOE

METHOD_NAME = "comoe"


def register() -> None:
    """Make the `COMOE` peft type known to peft. Runs on `import comoe_peft`; calling it again does nothing."""
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(COMOE) is not None:
        if PEFT_TYPE_TO_CONFIG_MAPPING[COMOE].__qualname__ == CoMoEConfig.__qualname__:
            # registered already (possibly by an earlier import of a reloaded module): point at the current classes
            PEFT_TYPE_TO_CONFIG_MAPPING[COMOE] = CoMoEConfig
            PEFT_TYPE_TO_TUNER_MAPPING[COMOE] = CoMoEModel
            return
        raise RuntimeError(f"peft already has another method registered as {COMOE!r}; cannot register CoMoE.")
    register_peft_method(name=METHOD_NAME, config_cls=CoMoEConfig, model_cls=CoMoEModel, prefix=CoMoEModel.prefix)


def is_registered() -> bool:
    """Whether peft currently knows the `COMOE` type (and its prefix `comoe_`)."""
    return PEFT_TYPE_TO_PREFIX_MAPPING.get(COMOE) == CoMoEModel.prefix


LOADING_NOTE_MARKER = "<!-- comoe_peft loading note -->"
LOADING_NOTE = f"""{LOADING_NOTE_MARKER}
## Loading this CoMoE adapter

This adapter was trained with [comoe_peft](https://arxiv.org/abs/2505.17553) (peft type `COMOE`). peft only knows
that type once the plugin is imported, so import it first; otherwise peft raises `KeyError: 'COMOE'`:

```python
import comoe_peft  # registers the COMOE peft type
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```
"""


def write_loading_note(folder: str) -> None:
    """Add a "how to load" section (import comoe_peft first) to the model card (README.md) of a saved adapter.

    Placed after the card's YAML front matter; written once (atomically), kept if the card is rewritten by peft.
    """
    import os
    from pathlib import Path

    from comoe_peft.tuner.files import write_text_atomic

    path = os.path.join(folder, "README.md")
    text = Path(path).read_text(encoding="utf-8") if os.path.isfile(path) else ""
    if LOADING_NOTE_MARKER in text:
        return
    head, body = "", text
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        end = text.index("\n---\n", 4) + len("\n---\n")
        head, body = text[:end], text[end:]
    write_text_atomic(path, head + "\n" + LOADING_NOTE + "\n" + body)
