"""Adds `PeftType.COMOE` to peft's enum, which `register_peft_method` requires before it accepts a new method.

peft has no plugin hook for new enum members, so the member is added the way `enum` itself stores members: in the
name and value maps, the ordered name list, and as a class attribute (needed on Python >= 3.12, where attribute
access no longer falls back to the member map). Safe to run more than once.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

COMOE_NAME = "COMOE"


def _add_peft_type_member(name: str) -> PeftType:
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing  # already added, e.g. the module was reloaded
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


COMOE: PeftType = _add_peft_type_member(COMOE_NAME)
"""The `PeftType.COMOE` member this package adds; `CoMoEConfig.peft_type` is always this value."""
