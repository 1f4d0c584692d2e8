"""Griffe extension: use a dataclass field's ``metadata={"help": ...}`` as its docstring in the API reference.

``CoMoEConfig`` (like ``peft.LoraConfig``) documents every field in ``field(..., metadata={"help": "..."})``. Griffe
reads source statically and would show those fields without a description; this extension copies the help text
into the attribute's docstring, so the configuration reference is generated from the same text that
``HfArgumentParser`` prints for ``--help``.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


def _help_text(node: ast.AST) -> str | None:
    if not isinstance(node, ast.AnnAssign) or not isinstance(node.value, ast.Call):
        return None
    call = node.value
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
    if name != "field":
        return None
    for keyword in call.keywords:
        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
            for key, value in zip(keyword.value.keys, keyword.value.values):
                if isinstance(key, ast.Constant) and key.value == "help":
                    try:
                        text = ast.literal_eval(value)
                    except ValueError:
                        return None
                    return text if isinstance(text, str) else None
    return None


class FieldHelpExtension(griffe.Extension):
    """Set the docstring of ``x: T = field(metadata={"help": ...})`` attributes that have none."""

    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        if attr.docstring is not None or not isinstance(node, ast.AST):
            return
        text = _help_text(node)
        if text:
            attr.docstring = griffe.Docstring(text, parent=attr)
