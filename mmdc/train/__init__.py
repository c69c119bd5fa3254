"""The student and its training: assembly, formatting, and Ray Train with DDP or DeepSpeed.

assembly.py         vision tower + projector + LM -> an HF LLaVA checkpoint; which parameters train per stage
templates.py        the chat template, stop token and image token shared by training and serving
formatting.py       Eq. 1 / Eq. 2 conversations and captions -> token ids and label masks
launcher.py         ``train_student``: one Ray Train job from a Dataset to a saved checkpoint
worker.py           the body of one Ray Train worker: load, train over the shard, save
strategies.py       DDP and DeepSpeed ZeRO behind one interface
checkpoints.py      resumable training state: where it lives and what it must match
deepspeed_config.py the DeepSpeed config a ``TrainConfig`` implies
progress.py         the progress line and the per-step metrics file
"""
