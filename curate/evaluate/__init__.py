"""Evaluation as DataComp runs it, from local webdatasets.

The package, in data-flow order: :mod:`~curate.evaluate.metrics` (clip_benchmark's
classification and retrieval metrics, WILDS/fairness group metrics, WinoGAViL's Jaccard),
:mod:`~curate.evaluate.tasks` (the task list and each task's data on disk),
:mod:`~curate.evaluate.models` (an open_clip model with a training checkpoint, encoders),
:mod:`~curate.evaluate.winogavil` (WinoGAViL instances, their export from a local HF copy, the
task), :mod:`~curate.evaluate.run` (the run loop over the task list, ``eval_results.jsonl``,
aggregates) and :mod:`~curate.evaluate.matrix` (TiC's dynamic evaluation matrix).

This module holds the error every part raises.
"""

from __future__ import annotations

from curate.errors import CurateError


class EvalError(CurateError):
    """Bad evaluation input (record, checkpoint, task list, dataset layout)."""
