"""Training with open_clip's own trainer at DataComp's fixed scales.

:mod:`~curate.train.trainer` builds and runs the open_clip command and writes the training
record; :mod:`~curate.train.entry` is the entry point torchrun starts on machines without a GPU.
"""
