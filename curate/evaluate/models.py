"""The model under evaluation: an open_clip architecture with the weights of a training checkpoint.

:func:`load_model` builds the model a training record names (``info.json``, written by
:mod:`curate.train.trainer`) and loads our checkpoint into it; :func:`encode_texts` and
:func:`encode_task_images` encode text and every image of a task once (images L2-normalised,
as the metrics expect). torch and open_clip are imported only when a model is used.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.evaluate import EvalError
from curate.evaluate.tasks import TaskData, iter_samples


@dataclass
class LoadedModel:
    """An open_clip model in eval mode with its preprocessing and tokenizer."""

    model: object
    preprocess: object
    tokenizer: object
    name: str
    checkpoint: str


def load_model(model_name: str, checkpoint: str | os.PathLike) -> LoadedModel:
    """open_clip model ``model_name`` with the weights of a training checkpoint (ours)."""
    import open_clip  # lazy: optional extra [torch]
    import torch  # lazy: optional extra [torch]

    ck = Path(checkpoint)
    if not ck.is_file():
        raise EvalError(f"{ck}: checkpoint not found")
    torch.manual_seed(0)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no pretrained weights are loaded: we load ours next
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    finally:
        root.setLevel(level)
    try:
        state = torch.load(ck, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is the user's input
        raise EvalError(f"{ck}: not a torch checkpoint ({str(e).splitlines()[0]})") from None
    sd = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise EvalError(f"{ck}: no state_dict inside")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise EvalError(f"{ck}: does not fit model {model_name} ({str(e).splitlines()[0]})") from None
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(model_name), model_name, str(ck))


def encode_texts(m: LoadedModel, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Text embeddings (not normalised), ``batch_size`` texts at a time."""
    import torch  # lazy: optional extra [torch]

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(m.model.encode_text(m.tokenizer(texts[i:i + batch_size])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def encode_task_images(m: LoadedModel, data: TaskData, batch_size: int, progress=None):
    """Encode every image once; returns (normalised image features, per-sample dicts, seconds)."""
    import torch  # lazy: optional extra [torch]

    feats, samples, batch = [], [], []
    t0 = time.perf_counter()

    def flush():
        with torch.no_grad():
            f = m.model.encode_image(torch.stack(batch)).float().numpy()
        feats.append(normalize(f))
        batch.clear()

    it = iter_samples(data.shards)
    if progress is not None:
        it = progress(it, total=data.count)
    for key, img, s in it:
        batch.append(m.preprocess(img))
        samples.append({k: s[k] for k in ("cls", "txt", "npy", "__key__") if k in s})
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    secs = time.perf_counter() - t0
    return (np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)), samples, secs

