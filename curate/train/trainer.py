"""Fixed training: run open_clip's own trainer with DataComp's hyperparameters on resharded data.

The benchmark's rule is that training never changes, only the data does. This module turns a
scale name (``train/scales.yaml``) and one or more resharder output directories into the exact
``open_clip_train.main`` command DataComp's ``train.py`` builds (spec §5.2), runs it as a
subprocess (``torchrun`` when several GPUs are visible), and writes the training record
``info.json`` next to ``checkpoints/`` (DataComp wrote ``info.pkl``; we never write pickles).

Differences from DataComp's ``train.py``, all forced by open_clip 3.3 or deliberate:

* open_clip 3.3 has no ``--new-run`` (TiC's patch) nor ``--blur-field``. ``new_run`` is done
  the way TiC's patch behaves: the previous checkpoint's weights are written as a bare
  state dict (``warmstart.pt``) and passed to ``--resume``, which open_clip loads as weights
  only (epoch 0, fresh AdamW and cosine schedule). ``--blur-field`` is refused.
* Shard discovery lists the tars that exist and compresses contiguous numbers into brace
  ranges, instead of assuming ``prefix{0..max}.tar`` is contiguous; subdirectories are walked
  whether or not they hold a ``meta.json``.
* Sample counts (from ``sizes.json`` or ``*_stats.json``) are only recorded: like DataComp we
  always pass ``--train-num-samples``, so open_clip never needs ``sizes.json``.
* Local shards are scanned (tar headers only) before the trainer starts, and a shard holding a
  member that webdataset's default decoders would unpickle (:data:`PICKLE_TYPES`) is refused:
  open_clip decodes every member of a sample with webdataset's ``basichandlers``, which call
  ``pickle.loads`` on ``.pyd``/``.pickle`` and ``torch.load`` on ``.pth``, so such a member
  would run code inside training. DataComp's ``train.py`` trains on whatever the shards hold.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import yaml

from curate import resources
from curate.atomic import atomic_path, write_json
from curate.engine import set_parent_death_signal
from curate.errors import CurateError
from curate.shards.tar import split_key

TRAIN_DIR = resources.train_dir()
SCALES_FILE = TRAIN_DIR / "scales.yaml"
MODELS_DIR = TRAIN_DIR / "models"
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "fp32")
SCALE_KEYS = ("model", "batch_size", "learning_rate", "warmup", "train_num_samples", "beta2")
RECORD_NAME = "info.json"


class TrainError(CurateError):
    """Bad training input (scale, data directory, weights, checkpoint)."""


# --------------------------------------------------------------------------- scales


def load_scales(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """All scale configurations from ``train/scales.yaml`` (or ``path``)."""
    path = Path(path or SCALES_FILE)
    try:
        scales = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TrainError(f"{path}: cannot read scale file: {str(e).splitlines()[0]}") from None
    if not isinstance(scales, dict):
        raise TrainError(f"{path}: expected a mapping of scale name -> config")
    for name, cfg in scales.items():
        missing = [k for k in SCALE_KEYS if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise TrainError(f"{path}: scale {name!r} lacks {', '.join(missing)}")
    return scales


def scale_config(scale: str, path: str | os.PathLike | None = None) -> dict:
    scales = load_scales(path)
    if scale not in scales:
        raise TrainError(f"unknown scale {scale!r}; known: {', '.join(scales)}")
    return dict(scales[scale])


def resolve_model(model: str) -> str:
    """An open_clip model name, or ``local-dir:ABS`` for a config directory under train/models/."""
    local = MODELS_DIR / model
    if (local / "open_clip_config.json").is_file():
        return f"local-dir:{local}"
    p = Path(model)
    if (p / "open_clip_config.json").is_file():
        return f"local-dir:{p.resolve()}"
    return model


# --------------------------------------------------------------------------- model names upstream tools load
#
# open_clip ignores ``pretrained=`` for a ``local-dir:`` name (it loads the weights found in
# that directory, and there are none), so clip_benchmark and DataComp's evaluate.py, which call
# ``create_model_and_transforms(NAME, pretrained=CHECKPOINT)``, would evaluate a randomly
# initialised model. The training record therefore names a config directory by a plain open_clip
# model name (the directory's name, e.g. ``tiny-vit``), and the run directory holds that name's
# config as ``open_clip_models/NAME.json``, the file ``open_clip.add_model_config`` registers.

MODEL_CONFIGS_DIR = "open_clip_models"


def model_config_file(model: str) -> Path | None:
    """The ``open_clip_config.json`` behind a config-directory model (a train/models/ name, a
    directory, or ``local-dir:DIR``), or None for an open_clip model name."""
    if model.startswith("local-dir:"):
        model = model[len("local-dir:"):]
    for d in (MODELS_DIR / model, Path(model)):
        if (d / "open_clip_config.json").is_file():
            return (d / "open_clip_config.json").resolve()
    return None


def plain_model_config(config_file: str | os.PathLike) -> dict:
    """The bare model config (``model_cfg`` of a wrapped ``open_clip_config.json``)."""
    try:
        cfg = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{config_file}: cannot read model config ({e})") from None
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise TrainError(f"{config_file}: not an open_clip model config (embed_dim, vision_cfg, text_cfg)")
    return cfg


def _builtin_models() -> set[str]:
    import open_clip  # lazy: optional extra [torch]

    return set(open_clip.list_models())


def record_model_name(model: str) -> str:
    """The model name ``info.json`` records: a config directory's name (registered with
    :func:`register_model` before use), unless open_clip already knows that name for another
    model, then ``local-dir:DIR``; an open_clip model name as it is."""
    cfg = model_config_file(model)
    if cfg is None:
        return model
    name = cfg.parent.name
    if name in _builtin_models() and _registered_config(name) != plain_model_config(cfg):
        return f"local-dir:{cfg.parent}"
    return name


def _registered_config(name: str) -> dict | None:
    import open_clip  # lazy: optional extra [torch]

    return open_clip.get_model_config(name)


def register_model(name: str, config_file: str | os.PathLike | None = None) -> str:
    """Make ``name`` an open_clip model name in this process (``open_clip.add_model_config``):
    from ``config_file`` (a bare ``NAME.json`` or a wrapped ``open_clip_config.json``) or the
    train/models/NAME directory. Names open_clip knows and ``local-dir:`` names are returned as
    they are; so is an unknown name without a config (open_clip reports it when used)."""
    import open_clip  # lazy: optional extra [torch]

    if name.startswith(("local-dir:", "hf-hub:")):
        return name
    src = Path(config_file) if config_file else model_config_file(name)
    if src is None:
        return name
    cfg = plain_model_config(src)
    known = _registered_config(name)
    if known is not None:
        if known != cfg:
            raise TrainError(f"model {name!r}: open_clip already has a different config under this name ({src})")
        return name
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"{name}.json"
        f.write_text(json.dumps(cfg))
        open_clip.add_model_config(f)
    return name


def write_model_config(run_dir: str | os.PathLike, name: str, config_file: str | os.PathLike) -> Path:
    """``run_dir/open_clip_models/NAME.json``: the bare config ``open_clip.add_model_config`` takes."""
    dest = Path(run_dir) / MODEL_CONFIGS_DIR / f"{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_json(dest, plain_model_config(config_file))
    return dest


# --------------------------------------------------------------------------- data


_NUMBERED = re.compile(r"^(.*?)(\d+)(\.tar)$")


@dataclass
class DataSource:
    """One ``--data`` entry: brace patterns open_clip/webdataset expand, and what we know of it."""

    entry: str
    patterns: list[str]
    num_shards: int
    num_samples: int | None  # None when neither sizes.json nor _stats.json covers every shard
    weight: float | None = None
    tars: list[Path] = field(default_factory=list, compare=False, repr=False)  # local shards


def brace_runs(prefix: str, numbers: list[tuple[int, int]], suffix: str) -> list[str]:
    """``[(n, width), ...]`` -> ``prefix{a..b}suffix`` patterns, one per contiguous run (numbers
    zero-padded to ``width``; a run only continues over numbers of the same width)."""
    out: list[str] = []
    numbers = sorted(numbers)
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1][0] == numbers[j][0] + 1 and numbers[j + 1][1] == numbers[i][1]:
            j += 1
        (a, w), (b, _) = numbers[i], numbers[j]
        if a == b:
            out.append(f"{prefix}{a:0{w}d}{suffix}")
        else:
            out.append(f"{prefix}{{{a:0{w}d}..{b:0{w}d}}}{suffix}")
        i = j + 1
    return out


def _shard_sizes(d: Path, tars: list[Path]) -> int | None:
    """Samples in ``tars`` from ``d/sizes.json`` (TiC add_sizes.py) or each ``_stats.json``."""
    sizes = {}
    sj = d / "sizes.json"
    if sj.is_file():
        try:
            sizes = json.loads(sj.read_text())
        except (OSError, ValueError) as e:
            raise TrainError(f"{sj}: not valid JSON ({e})") from None
        if not isinstance(sizes, dict):
            raise TrainError(f"{sj}: expected an object {{shard name: samples}}")
    total = 0
    for t in tars:
        if t.name in sizes:
            total += int(sizes[t.name])
            continue
        stats = t.with_name(t.name[: -len(".tar")] + "_stats.json")
        if not stats.is_file():
            return None
        try:
            total += int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{stats}: cannot read 'successes' ({e!r})") from None
    return total


def _dir_patterns(d: Path) -> tuple[list[str], list[Path]]:
    patterns: list[str] = []
    tars: list[Path] = []
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for t in sorted(d.glob("*.tar")):
        m = _NUMBERED.match(t.name)
        tars.append(t)
        if m:
            groups.setdefault((m.group(1), m.group(3)), []).append((int(m.group(2)), len(m.group(2))))
        else:
            patterns.append(str(t))
    for (prefix, suffix), nums in sorted(groups.items()):
        patterns.extend(brace_runs(f"{d}{os.sep}{prefix}", nums, suffix))
    for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
        p2, t2 = _dir_patterns(sub)
        patterns.extend(p2)
        tars.extend(t2)
    return patterns, tars


def discover_shards(entry: str | os.PathLike) -> DataSource:
    """Shards of one ``--data`` entry: a ``.tar``, a resharder output dir, or a dir of such dirs."""
    p = Path(entry)
    if str(entry).startswith(("s3://", "pipe:", "http://", "https://")):
        # Remote patterns go to webdataset as given (brace notation allowed); size unknown.
        return DataSource(str(entry), [str(entry)], 0, None)
    if p.is_file() and p.suffix == ".tar":
        n = _shard_sizes(p.parent, [p])
        return DataSource(str(entry), [str(p.resolve())], 1, n, tars=[p.resolve()])
    if not p.is_dir():
        raise TrainError(f"--data {entry}: not a directory or .tar file")
    patterns, tars = _dir_patterns(p.resolve())
    if not tars:
        raise TrainError(f"--data {entry}: no .tar shards found (expected resharder output)")
    by_dir: dict[Path, list[Path]] = {}
    for t in tars:
        by_dir.setdefault(t.parent, []).append(t)
    total: int | None = 0
    for d, ts in by_dir.items():
        n = _shard_sizes(d, ts)
        total = None if (n is None or total is None) else total + n
    if total == 0:
        raise TrainError(f"--data {entry}: shards hold 0 samples (per sizes.json/_stats.json)")
    return DataSource(str(entry), patterns, len(tars), total, tars=tars)


# Member types webdataset's default decoders (webdataset 0.2.x ``autodecode.basichandlers``,
# which open_clip's ``wds.decode("pilrgb")`` ends with) turn into objects with pickle:
# ``pyd``/``pickle`` -> pickle.loads, ``pth`` -> torch.load. A ``.gz`` suffix is decompressed
# first (``gzfilter``) and then decoded by the same table. ``pkl`` and ``pt`` are not in that table
# today but are pickles by convention, so they are refused too. ``npy``/``npz`` are read with
# numpy's default allow_pickle=False (an object array fails to decode instead of unpickling).
PICKLE_TYPES = ("pyd", "pickle", "pth", "pkl", "pt")


def pickle_member_type(name: str) -> str | None:
    """The pickle-decoded type of a tar member name (``pyd`` for ``k.pyd``, ``k.x.pth.gz``), or None."""
    _, ext = split_key(name)
    if ext is None:
        return None
    parts = ext.lower().split(".")
    while len(parts) > 1 and parts[-1] == "gz":
        parts.pop()
    return parts[-1] if parts[-1] in PICKLE_TYPES else None


def check_shard_members(path: str | os.PathLike) -> None:
    """Refuse a shard holding a member that webdataset would unpickle; reads tar headers only.

    The headers are parsed by Python's ``tarfile``, the parser webdataset itself uses (names from
    PAX, GNU long-name and Solaris headers, sparse members, compressed tars), so the names
    checked are the names the data loader will see.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return  # an empty file: webdataset skips it, nothing in it to decode
        with tarfile.open(path, "r:*") as tf:
            while (ti := tf.next()) is not None:
                tf.members = []  # headers only: keep no list of a large shard's members
                if not ti.isreg():
                    continue  # webdataset reads regular members only
                kind = pickle_member_type(ti.name)
                if kind is not None:
                    raise TrainError(
                        f"{path}: member {ti.name!r} (at byte {ti.offset}) is a .{kind} file, which the "
                        f"training data loader would unpickle (code could run); refusing to train on "
                        f"this shard (remove the member, e.g. by resharding with `curate reshard`)")
    except OSError as e:
        raise TrainError(f"{path}: cannot read shard ({e.strerror or e})") from None
    except (tarfile.TarError, EOFError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainError(f"{path}: not a readable tar ({why})") from None


def check_sources(sources: list[DataSource]) -> None:
    """Check every local shard of ``sources`` (:func:`check_shard_members`)."""
    for s in sources:
        for t in s.tars:
            check_shard_members(t)


def parse_data(data: str, weights: str | None = None) -> list[DataSource]:
    """``DIR[::DIR...]`` and optional ``W[::W...]`` (one weight per entry) -> sources."""
    entries = [e for e in data.split("::") if e]
    if not entries:
        raise TrainError("--data is empty")
    sources = [discover_shards(e) for e in entries]
    if weights is not None:
        ws = weights.split("::")
        if len(ws) != len(entries):
            raise TrainError(f"--data-weights has {len(ws)} values for {len(entries)} --data entries")
        for s, w in zip(sources, ws):
            try:
                s.weight = float(w)
            except ValueError:
                raise TrainError(f"--data-weights: {w!r} is not a number") from None
            if not s.weight >= 0:
                raise TrainError(f"--data-weights: {w!r} must be >= 0")
    return sources


def train_data_args(sources: list[DataSource]) -> tuple[str, str | None]:
    """``--train-data`` and ``--train-data-upsampling-factors`` values.

    As in DataComp, an entry's weight is repeated for every component it emits; open_clip then
    gives every shard of that component that weight, so a directory's share of the draws is
    proportional to weight x number of shards.
    """
    components, factors = [], []
    for s in sources:
        for pat in s.patterns:
            components.append(pat)
            if s.weight is not None:
                factors.append(repr(s.weight))
    weighted = any(s.weight is not None for s in sources)
    return "::".join(components), ("::".join(factors) if weighted else None)


# --------------------------------------------------------------------------- command


@dataclass
class TrainSpec:
    scale: str
    data: str
    output_dir: Path
    data_weights: str | None = None
    exp_name: str | None = None
    workers: int = 4
    precision: str | None = None
    num_checkpoints: int = 5
    seed: int = 0
    accum_freq: int = 1
    log_every_n_steps: int = 100
    resume: str = "latest"
    new_run: bool = False
    warmup: int | None = None
    train_num_samples: int | None = None
    grad_clip_norm: float | None = None
    save_frequency: int = 0
    report_to_wandb: bool = False
    wandb_project_name: str = "datanet"
    imagenet_val: str | None = None
    blur_field: str | None = None
    scales_file: str | None = None
    nproc: int | None = None  # processes; None = number of visible GPUs (>= 1)
    threads: int | None = None  # CPU threads per process (OMP_NUM_THREADS); None = torch's default
    extra_args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.exp_name or f"{self.scale}_scale"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def visible_gpus() -> int:
    try:
        import torch  # lazy: optional extra [torch]

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch means no GPU to use
        return 0


def build_command(spec: TrainSpec, sources: list[DataSource], cfg: dict, world_size: int,
                  resume: str | None) -> list[str]:
    """The open_clip_train argument list DataComp's train.py builds (spec §5.2), for open_clip 3.3."""
    if spec.blur_field:
        raise TrainError("--blur-field: open_clip 3.3 has no such option (it came from DataComp's open_clip fork)")
    precision = spec.precision or cfg.get("precision") or "amp"
    if precision not in PRECISIONS:
        raise TrainError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    per_gpu = cfg["batch_size"] // (world_size * spec.accum_freq)
    if per_gpu < 1:
        raise TrainError(f"batch {cfg['batch_size']} cannot be split over {world_size} processes x accum {spec.accum_freq}")
    if spec.num_checkpoints < 1:
        raise TrainError(f"--num-checkpoints {spec.num_checkpoints}: must be >= 1")
    warmup = cfg["warmup"] if spec.warmup is None else spec.warmup
    total = cfg["train_num_samples"] if spec.train_num_samples is None else spec.train_num_samples
    train_data, factors = train_data_args(sources)
    args = [
        "--save-frequency", str(spec.save_frequency),
        "--ddp-static-graph", "--local-loss", "--gather-with-grad", "--grad-checkpointing",
        "--train-data", train_data,
        "--train-num-samples", str(total // spec.num_checkpoints),
        "--warmup", str(warmup),
        "--dataset-type", "webdataset",
        "--precision", precision,
        "--workers", str(spec.workers),
        "--model", resolve_model(cfg["model"]),
        "--batch-size", str(per_gpu),
        "--epochs", str(spec.num_checkpoints),
        "--lr", repr(float(cfg["learning_rate"])),
        "--logs", str(Path(spec.output_dir).resolve()),
        "--name", spec.name,
        "--seed", str(spec.seed),
        "--accum-freq", str(spec.accum_freq),
        "--log-every-n-steps", str(spec.log_every_n_steps),
        "--save-most-recent",
        "--dataset-resampled",
    ]
    if resume is not None:
        args += ["--resume", resume]
    if spec.report_to_wandb:
        args += ["--report-to", "wandb", "--wandb-project-name", spec.wandb_project_name]
    if spec.imagenet_val:
        args += ["--imagenet-val", spec.imagenet_val]
    if cfg.get("beta2") is not None:
        args += ["--beta2", repr(float(cfg["beta2"]))]
    if factors is not None:
        args += ["--train-data-upsampling-factors", factors]
    if spec.grad_clip_norm is not None:
        args += ["--grad-clip-norm", repr(float(spec.grad_clip_norm))]
    return args + list(spec.extra_args)


def launcher(world_size: int, gpus: int | None = None) -> list[str]:
    if world_size > 1:
        # "--" ends torchrun's own options: its argparse would otherwise reject open_clip's
        # `--logs` as an ambiguous prefix of its `--logs-specs` / `--logs_specs` (torch >= 2.2).
        # --standalone: a rendezvous on a free local port, not a fixed 29500.
        # Without GPUs, curate.train.entry lets open_clip wrap a CPU model in DDP (gloo).
        entry = "open_clip_train.main" if (visible_gpus() if gpus is None else gpus) else "curate.train.entry"
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
                "-m", "--", entry]
    return [sys.executable, "-m", "open_clip_train.main"]


# --------------------------------------------------------------------------- resume / warm start


def latest_checkpoint(run_dir: Path) -> Path | None:
    p = Path(run_dir) / "checkpoints" / "epoch_latest.pt"
    return p if p.is_file() else None


def write_warmstart(checkpoint: Path, dest: Path, distributed: bool = False) -> Path:
    """Weights only (a bare state dict) of ``checkpoint``, which open_clip loads with epoch 0.

    This is TiC's ``--new-run``: keep the weights, restart optimizer, schedule and epoch.
    With ``distributed`` (several processes under torchrun) the keys carry DDP's ``module.``
    prefix: open_clip wraps the model in DistributedDataParallel before it loads a bare
    ``--resume`` state dict, and strips the prefix only for a non-distributed run.
    """
    import torch  # lazy: optional extra [torch]

    if not Path(checkpoint).is_file():
        raise TrainError(f"--resume {checkpoint}: checkpoint not found")
    try:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise TrainError(f"--resume {checkpoint}: not a torch checkpoint ({str(e).splitlines()[0]})") from None
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise TrainError(f"--resume {checkpoint}: no state_dict inside")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if distributed:
        sd = {f"module.{k}": v for k, v in sd.items()}
    with atomic_path(dest) as tmp:
        torch.save(sd, tmp)
    return dest


def resume_argument(spec: TrainSpec, world_size: int = 1) -> str | None:
    """What to pass as ``--resume`` given the run's state on disk."""
    run_dir = spec.run_dir
    own = latest_checkpoint(run_dir)
    if spec.new_run:
        if spec.resume in (None, "", "latest"):
            raise TrainError("--new-run needs --resume CHECKPOINT (the model to warm-start from)")
        if own is not None:
            return "latest"  # this new run was interrupted after a checkpoint: continue it
        log = run_dir / "out.log"
        if log.exists():
            # open_clip refuses an existing experiment unless resuming 'latest'; the old log
            # belongs to our own interrupted attempt, keep it under another name.
            log.rename(run_dir / f"out.{int(time.time())}.log")
        return str(write_warmstart(Path(spec.resume), run_dir / "warmstart.pt", distributed=world_size > 1))
    if spec.resume in (None, "", "none"):
        return None
    if spec.resume != "latest" and not Path(spec.resume).is_file():
        raise TrainError(f"--resume {spec.resume}: checkpoint not found")
    return spec.resume


# --------------------------------------------------------------------------- run


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    record: Path
    command: list[str]
    elapsed: float
    samples_available: int | None


def _run(cmd: list[str], env: dict, log_tail: list[str], echo) -> int:
    # The trainer stays in our process group, so killing the group (Ctrl-C, a scheduler, a
    # test) takes it and its data workers down with us; a SIGTERM sent to this process alone
    # is forwarded to it; and if this process dies any other way (kill -9), the kernel sends
    # the trainer SIGTERM (Linux), which torchrun passes on to its ranks.
    parent = os.getpid()

    def _die_with_us():  # runs in the child between fork and exec
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, preexec_fn=_die_with_us)
    old = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise SystemExit(128 + signum)

        old = signal.signal(signal.SIGTERM, _term)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log_tail.append(line.rstrip("\n"))
            del log_tail[:-50]
            if echo is not None:
                echo(line.rstrip("\n"))
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def train(spec: TrainSpec, echo=None) -> TrainResult:
    """Train ``spec.scale`` on ``spec.data`` with open_clip's trainer; returns where it wrote.

    Re-running the same command continues from ``checkpoints/epoch_latest.pt`` (open_clip's
    ``--resume latest``); a finished run returns at once with its record refreshed.
    """
    cfg = scale_config(spec.scale, spec.scales_file)
    sources = parse_data(spec.data, spec.data_weights)
    check_sources(sources)  # before anything is created or launched
    gpus = visible_gpus()
    world = spec.nproc or max(1, gpus)
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    resume = resume_argument(spec, world)
    args = build_command(spec, sources, cfg, world, resume)
    cmd = launcher(world, gpus) + args
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not spec.report_to_wandb:
        env["WANDB_MODE"] = "disabled"
    if spec.threads:
        # On a shared or small CPU box, torch's default (one thread per core, busy-waiting)
        # next to the data workers runs ~10x slower than one thread (measured: docs/training.md).
        env["OMP_NUM_THREADS"] = str(spec.threads)
    t0 = time.perf_counter()
    tail: list[str] = []
    rc = _run(cmd, env, tail, echo)
    elapsed = time.perf_counter() - t0
    ckpt = latest_checkpoint(spec.run_dir)
    if rc != 0 or ckpt is None:
        last = next((ln for ln in reversed(tail) if ln.strip()), "no output")
        raise TrainError(f"open_clip_train exited with status {rc} for {spec.run_dir}"
                         f"{'' if ckpt else ' (no checkpoints/epoch_latest.pt)'}: {last.strip()}")
    import torch  # lazy: optional extra [torch]

    # Only what the record needs; the checkpoint is ours (just written by open_clip).
    done_epochs = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    total = cfg["train_num_samples"] if spec.train_num_samples is None else spec.train_num_samples
    samples_available = (None if any(s.num_samples is None for s in sources)
                         else sum(s.num_samples for s in sources))
    model_name = record_model_name(cfg["model"])
    model_cfg = model_config_file(cfg["model"])
    model_config = None
    if model_cfg is not None and not model_name.startswith("local-dir:"):
        model_config = str(write_model_config(spec.run_dir, model_name, model_cfg).resolve())
    record = {
        "scale": spec.scale,
        "checkpoint": str(ckpt.resolve()),
        "model": model_name,  # an open_clip name; for a config dir, see "model_config"
        "model_config": model_config,  # open_clip.add_model_config(this) makes "model" loadable
        "trained_model_arg": resolve_model(cfg["model"]),
        "scale_config": cfg,
        "data_dir": spec.data,
        "data_weights": spec.data_weights,
        "data": [{"entry": s.entry, "shards": s.num_shards, "samples": s.num_samples,
                  "weight": s.weight} for s in sources],
        "samples_available": samples_available,
        "train_num_samples": total,
        "warmup": cfg["warmup"] if spec.warmup is None else spec.warmup,
        "epochs_done": done_epochs,
        "num_checkpoints": spec.num_checkpoints,
        "seed": spec.seed,
        "precision": spec.precision or cfg.get("precision") or "amp",
        "world_size": world,
        "threads": spec.threads,
        "new_run": spec.new_run,
        "resumed_from": resume,
        "command": cmd,
        "open_clip_version": _open_clip_version(),
        "elapsed_seconds": round(elapsed, 2),
    }
    rec_path = spec.run_dir / RECORD_NAME
    write_json(rec_path, record)
    return TrainResult(spec.run_dir, ckpt, rec_path, cmd, elapsed, samples_available)


def _open_clip_version() -> str | None:
    try:
        return version("open_clip_torch")
    except Exception:  # noqa: BLE001
        return None


def read_record(run_dir: str | os.PathLike) -> dict:
    """The training record of a run directory (``{output_dir}/{exp_name}``)."""
    p = Path(run_dir) / RECORD_NAME
    if not p.is_file():
        raise TrainError(f"{p}: no training record (run `curate train` first)")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise TrainError(f"{p}: not valid JSON ({e})") from None
