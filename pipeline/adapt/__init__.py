"""Adapting Stable Diffusion with HPS: the paper's align_sd recipe as one resumable loop.

prompts people used (`prompts`) → several images per prompt with the serving SD version,
scored by the serving HPS classifier, blurry ones dropped (`samples`) → per prompt, the top
image positive and the bottom one negative when the softmax of the scores singles them out
(`label`) → the fine-tuning set: positives with their prompt, negatives with the identifier
("Weird image. ") before it, plus regularization images (`dataset`) → LoRA on the UNet
(`lora_train`) → paired offline evaluation on held-out prompts (`evaluate`) → registered as
an `sd_adapter` version and, if it passes, served in A/B rounds → promoted or retired by its
live win rate (`live`). `run` lists the stages as a recipe (`pipeline.runs`), whose run
directory's manifest lets a crashed run resume after its last finished stage.

This package is imported by the scheduler (for `live`): modules import torch only where
they need it, never here.
"""
