"""The experiments layer: the main job (`comoe-peft` CLI, run folders, tasks and data, the default model,
evaluation, analysis). It imports the training and tuner layers; nothing below imports it."""
