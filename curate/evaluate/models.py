"""The model under evaluation: an open_clip architecture with the weights of a training checkpoint.

:func:`load_model` builds the model a training record names (``info.json``, written by
:mod:`curate.train.trainer`) and loads our checkpoint into it; :func:`encode_texts` and
:func:`encode_task_images` encode text and every image of a task once (images L2-normalised,
as the metrics expect). torch and open_clip are imported only when a model is used.

Precision follows DataComp's evaluation: it runs clip_benchmark with ``amp=True``, i.e.
``torch.cuda.amp.autocast`` (float16) on a GPU, which is a no-op on the CPU. So ``auto`` (the
default) is ``amp`` on CUDA and ``fp32`` elsewhere; ``fp32``, ``amp`` (float16 autocast) and
``bf16`` (bfloat16 autocast) can be chosen. Each result records the precision and device.

The zero-shot classifier of a task (class names x templates, each template filled with
``template.format(c=classname)`` as clip_benchmark does) is built once per (model, checkpoint,
precision, device, class names, templates): :class:`ClassifierCache` keeps it for the run and
on disk beside the results (``classifiers/<sha256>.npy``), so re-runs and the TiC years that
share ImageNet's 1,000 classes x 80 templates reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.atomic import atomic_path
from curate.errors import CurateError
from curate.evaluate import EvalError
from curate.evaluate.metrics import zero_shot_weights
from curate.evaluate.tasks import TaskData, iter_samples
from curate.train.trainer import register_model

PRECISIONS = ("auto", "fp32", "amp", "bf16")


@dataclass
class LoadedModel:
    """An open_clip model in eval mode with its preprocessing and tokenizer."""

    model: object
    preprocess: object
    tokenizer: object
    name: str
    checkpoint: str
    device: str = "cpu"
    precision: str = "fp32"  # resolved: fp32 | amp | bf16

    def autocast(self):
        """The autocast context DataComp/clip_benchmark evaluate under at this precision."""
        import torch  # lazy: optional extra [torch]

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "amp" else torch.bfloat16
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``amp`` on CUDA (DataComp's ``amp=True``), ``fp32`` elsewhere."""
    if precision not in PRECISIONS:
        raise EvalError(f"--precision {precision}: one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "amp" if str(device).startswith("cuda") else "fp32"
    return precision


def default_device() -> str:
    import torch  # lazy: optional extra [torch]

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_name: str, checkpoint: str | os.PathLike, device: str | None = None,
               precision: str = "fp32", model_config: str | os.PathLike | None = None) -> LoadedModel:
    """open_clip model ``model_name`` with the weights of a training checkpoint (ours), on
    ``device`` (default: CUDA when available) evaluated at ``precision`` (see the module doc).

    ``model_name`` is what ``info.json`` records: an open_clip name, a train/models/ directory
    name (registered with open_clip here, from ``model_config`` when given, the record's
    ``model_config``), or an older run's ``local-dir:DIR``."""
    import open_clip  # lazy: optional extra [torch]
    import torch  # lazy: optional extra [torch]

    try:
        model_name = register_model(model_name, model_config)
    except CurateError as e:
        raise EvalError(str(e)) from None
    device = device or default_device()
    precision = resolve_precision(precision, device)
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
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise EvalError(f"--device {device}: cannot use it ({str(e).splitlines()[0]})") from None
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(model_name), model_name, str(ck),
                       str(device), precision)


def encode_texts(m: LoadedModel, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Text embeddings (not normalised), ``batch_size`` texts at a time."""
    import torch  # lazy: optional extra [torch]

    out = []
    with torch.no_grad(), m.autocast():
        for i in range(0, len(texts), batch_size):
            tokens = m.tokenizer(texts[i:i + batch_size]).to(m.device)
            out.append(m.model.encode_text(tokens).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fill_template(template: str, classname: str, where: str = "templates") -> str:
    """clip_benchmark's prompt: ``template.format(c=classname)`` (``{{``/``}}`` are literal braces)."""
    try:
        return template.format(c=classname)
    except (KeyError, IndexError, ValueError) as e:
        raise EvalError(f"{where}: template {template!r} is not a format string with {{c}} ({e!r})") from None


@dataclass
class ClassifierCache:
    """Zero-shot classifiers by (model, checkpoint, precision, device, class names, templates):
    built once per run, and kept in ``directory`` (``<sha256>.npy``) when one is given."""

    directory: Path | None = None
    built: int = 0
    loaded: int = 0
    _mem: dict = field(default_factory=dict)

    def key(self, m: LoadedModel, classnames: list[str], templates: list[str]) -> str:
        ck = Path(m.checkpoint)
        st = ck.stat()
        ident = {"model": m.name, "checkpoint": str(ck.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "precision": m.precision, "device": m.device.split(":")[0], "classnames": classnames,
                 "templates": templates}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def get(self, m: LoadedModel, classnames: list[str], templates: list[str], where: str = "templates") -> np.ndarray:
        """The D x C classifier (clip_benchmark's: mean of normalised template embeddings)."""
        k = self.key(m, classnames, templates)
        if k in self._mem:
            return self._mem[k]
        path = self.directory / f"{k}.npy" if self.directory is not None else None
        w = None
        if path is not None and path.is_file():
            try:
                w = np.load(path, allow_pickle=False)
            except (ValueError, OSError):
                w = None  # unreadable cache entry: rebuild it below
            if w is not None and (w.ndim != 2 or w.shape[1] != len(classnames)):
                w = None
            if w is not None:
                self.loaded += 1
        if w is None:
            prompts = [[fill_template(t, c, where) for t in templates] for c in classnames]
            w = zero_shot_weights([encode_texts(m, p) for p in prompts])
            self.built += 1
            if path is not None:
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, w, allow_pickle=False)
        self._mem[k] = w
        return w


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def encode_task_images(m: LoadedModel, data: TaskData, batch_size: int, progress=None):
    """Encode every image once; returns (normalised image features, per-sample dicts, seconds)."""
    import torch  # lazy: optional extra [torch]

    feats, samples, batch = [], [], []
    t0 = time.perf_counter()

    def flush():
        with torch.no_grad(), m.autocast():
            f = m.model.encode_image(torch.stack(batch).to(m.device)).float().cpu().numpy()
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

