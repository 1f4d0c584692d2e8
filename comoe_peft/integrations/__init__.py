"""Integrations with other training frameworks, beside the three layers: each may import the training and tuner
layers, and nothing imports them. `comoe_peft.integrations.axolotl` is the axolotl plugin (it needs the `axolotl`
extra: `pip install "comoe-peft[axolotl]"`); `comoe_peft.integrations.llamafactory` the LLaMA-Factory recipe, which
imports LLaMA-Factory only when called. This package itself imports nothing.
"""
