"""Evaluation as DataComp runs it: metrics, task data, model loading, WinoGAViL, the run loop,
and the TiC transfer matrix."""
