"""Benchmark: text features (fastText + caption counts + WordNet), the CLD3 table, the text baselines.

Prints, from one run:
  A. cold `features text` throughput per core vs the bound: the bare fastText predict rate on the
     same captions (batched, one process); then the same with both cores (workers=2); and the
     separate CLD3 table (`features cld3`, only laion2b reads it) vs the bare CLD3 rate. Also the
     uid-set parity of basic_filter,
     text_based and laion2b with DataComp's row-wise pandas code (implemented below) on that pool.
  B. with features cached, `basic_filter.sql` on a large generated pool vs a bare DuckDB scan of
     the columns it reads, and vs DataComp's naive way (pandas row-wise apply per caption,
     which recomputes language ID on every run).
  S. workers=1 vs workers=2 on a pool big enough to amortise starting the worker processes.
  C. the WordNet step scales with distinct words, not captions: entity flags over N captions
     drawn from a V-word vocabulary, and DataComp's per-word nltk lookup with list membership.

Usage: python bench/bench_text.py [--parts ABSC] [--rows 2000000] [--parity-rows 100000] [--scaling-rows 2000000]
       [--work bench/_work/text]   (figures in docs/text-features.md: --rows 10000000)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curate.catalog.connection import connect, init_catalog  # noqa: E402
from curate.features.langid import Cld3LID, FastTextLID, bundled_lid_model  # noqa: E402
from curate.run.runner import run_filter  # noqa: E402
from curate.features import cld3 as cld3features, text as textfeatures  # noqa: E402
from curate.features.cld3 import build_text_lang_cld3  # noqa: E402
from curate.engine import Engine  # noqa: E402
from curate.pool.sample import generate_pool  # noqa: E402
from curate.features.text import BATCH_ROWS, build_text_features, entity_flags  # noqa: E402
from curate.features.wordnet import EntityMatcher, ensure_wordnet, load_in21k_offsets, load_reader  # noqa: E402

FILTERS = ROOT / "filters"


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: the machine is shared, so rates per
    CPU-second are the per-core figures (wall-clock rates depend on what else is running)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_cpu(fn, *a, **kw):
    c, t = cpu_seconds(), time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t, cpu_seconds() - c


def make_pool(work: Path, name: str, files: int, rows_per_file: int, fast: bool) -> Path:
    root = work / name
    if not (root / "metadata").is_dir():
        generate_pool(root, files=files, rows_per_file=rows_per_file, seed=7, npz=False, shards=False, fast=fast)
    cat = work / f"{name}.duckdb"
    if not cat.exists():
        init_catalog(cat, pool=root, features_dir=work / f"{name}.features")
    return cat


def pool_texts(cat: Path) -> pa.Array:
    con = connect(cat)
    t = con.sql("SELECT text FROM pool").to_arrow_table().column(0).combine_chunks()
    con.close()
    return t


# ---- DataComp's way (baselines/apply_filter.py), re-implemented for comparison --------------

class Naive:
    def __init__(self):
        import fasttext
        import gcld3

        self.model = fasttext.load_model(str(bundled_lid_model()))
        self.cld3 = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        self.wordnet = load_reader(ensure_wordnet())
        self.entity_list = sorted(load_in21k_offsets())  # a list, as in DataComp

    def ft_lang(self, text):
        return self.model.predict(text.replace("\n", " "))[0][0].split("__label__")[1]

    def has_entity(self, text):
        for word in text.split():
            synsets = self.wordnet.synsets(word)
            if synsets and synsets[0].offset() in self.entity_list:
                return True
        return False

    def uids(self, metadata: Path, name: str) -> list[str]:
        import pandas as pd

        out = []
        for path in sorted(metadata.glob("*.parquet")):
            df = pd.read_parquet(path, columns=["uid", "text", "original_width", "original_height",
                                                "clip_b32_similarity_score"])
            if name == "basic_filter":
                lang = df.text.apply(self.ft_lang)
                words = df.text.apply(lambda x: len(x.split()))
                chars = df.text.apply(len)
                mn = np.minimum(df.original_width, df.original_height)
                mx = np.maximum(df.original_width, df.original_height)
                with np.errstate(divide="ignore", invalid="ignore"):
                    aspect = mx / mn
                mask = (lang == "en") & (words > 2) & (chars > 5) & (mn >= 200) & (aspect <= 3.0)
            elif name == "text_based":
                mask = (df.text.apply(self.ft_lang) == "en") & df.text.apply(self.has_entity)
            else:
                lang = df.text.apply(lambda x: self.cld3.FindLanguage(x.replace("\n", " ")).language)
                mask = (lang == "en") & (df.clip_b32_similarity_score >= 0.28)
            out.extend(df.uid[mask])
        return sorted(out)


def ours_uids(cat: Path, name: str, work: Path) -> list[str]:
    out = work / f"{name}.npy"
    run_filter(FILTERS / f"{name}.sql", catalog=cat, out=out)
    arr = np.load(out)
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(arr["f0"], arr["f1"])]


# ---- A: cold throughput vs the model bound, and parity -------------------------------------

def distinct_caption_pool(work: Path, src: Path, name: str) -> Path:
    """A copy of a pool whose captions are all distinct (" #<row>" appended): the worst case."""
    root = work / name / "metadata"
    if not root.is_dir():
        root.mkdir(parents=True)
        for path in sorted((Path(str(src)[: -len(".duckdb")]) / "metadata").glob("*.parquet")):
            t = pq.read_table(path)
            rows = pa.array(np.char.add(" #", np.arange(t.num_rows).astype(str)).astype(object))
            t = t.set_column(t.schema.get_field_index("text"), "text",
                             pa.compute.binary_join_element_wise(t.column("text"), rows, ""))
            pq.write_table(t, root / path.name)
    cat = work / f"{name}.duckdb"
    if not cat.exists():
        init_catalog(cat, pool=work / name, features_dir=work / f"{name}.features")
    return cat


def throughput(cat: Path, label: str) -> None:
    texts = pool_texts(cat)
    n = len(texts)
    distinct = len(pa.compute.unique(texts))
    ft, cld3 = FastTextLID(), Cld3LID()
    ft.labels(texts[:1000])
    _, w_ft, c_ft = timed_cpu(ft.labels, texts)
    _, w_cld3, c_cld3 = timed_cpu(cld3.labels, texts)
    textfeatures._MODELS = None  # cold: this process loads the models inside the timing
    res1, w1, c1 = timed_cpu(build_text_features, cat, engine=Engine(workers=1), progress=False, force=True)
    _, w1w, c1w = timed_cpu(build_text_features, cat, engine=Engine(workers=1), progress=False, force=True)
    _, w2, c2 = timed_cpu(build_text_features, cat, engine=Engine(workers=2), progress=False, force=True)
    cld3features._CLD3 = None  # cold
    _, wc1, cc1 = timed_cpu(build_text_lang_cld3, cat, engine=Engine(workers=1), progress=False, force=True)
    print(f"A. cold text features, {n:,} {label} captions ({distinct / n:.0%} distinct), "
          f"fastText {res1.settings['lid_model']['name']}; rates per CPU-second (per wall-second)")

    def line(what, c, w, bound=None):
        extra = ""
        if bound:
            name, cb = bound
            extra = f" -> {name} bound / ours = {n / cb / (n / c):.2f}x"
        print(f"   {what:<52} {n / c:>9,.0f}/s ({n / w:>9,.0f}/s){extra}")

    line("bare fastText predict (batched, every caption)", c_ft, w_ft)
    line("bare CLD3 FindLanguage (every caption)", c_cld3, w_cld3)
    line("text_features, workers=1, cold (load, read, write)", c1, w1, ("fastText", c_ft))
    line("text_features, workers=1, models already loaded", c1w, w1w, ("fastText", c_ft))
    line("text_features, workers=2 (spawned workers load)", c2, w2, ("fastText", c_ft))
    line("text_lang_cld3 (laion2b only), workers=1, cold", cc1, wc1, ("CLD3", c_cld3))


def part_a(work: Path, rows: int) -> None:
    cat = make_pool(work, f"pool_a_{rows}", files=4, rows_per_file=rows // 4, fast=False)
    throughput(cat, "generated")
    throughput(distinct_caption_pool(work, cat, f"pool_u_{rows}"), "all-distinct")
    naive = Naive()
    meta = Path(str(cat)[: -len(".duckdb")]) / "metadata"
    for name in ("basic_filter", "text_based", "laion2b"):
        ours, t_ours = timed(ours_uids, cat, name, work)
        theirs, t_theirs = timed(naive.uids, meta, name)
        same = "EQUAL" if ours == theirs else "DIFFERENT"
        print(f"   parity {name:<13} {len(ours):>7,} uids: {same}; ours (features cached) {t_ours:.2f}s, "
              f"DataComp row-wise {t_theirs:.1f}s ({t_theirs / t_ours:.0f}x)")


# ---- B: cached basic_filter on a large pool vs a bare scan and the naive way -----------------

def part_b(work: Path, rows: int) -> None:
    files = max(1, rows // 1_000_000)
    cat = make_pool(work, f"pool_b_{rows}", files=files, rows_per_file=rows // files, fast=True)
    res, t_feat = timed(build_text_features, cat, engine=Engine(workers=2), progress=True)
    if res.computed:
        print(f"B. computed text features for {res.rows_computed:,} rows in {t_feat:.1f}s "
              f"({res.rows_computed / t_feat:,.0f} captions/s, 2 workers)")
    out = work / "basic_b.npy"
    run_filter(FILTERS / "basic_filter.sql", catalog=cat, out=out)  # warm the page cache
    r, t_ours = timed(run_filter, FILTERS / "basic_filter.sql", catalog=cat, out=out)
    con = connect(cat)

    def bare():
        a = con.sql("SELECT uid, file, \"row\", original_width, original_height FROM pool").to_arrow_table()
        b = con.sql("SELECT file, \"row\", lang_fasttext, n_words, n_chars FROM text_features").to_arrow_table()
        return a.num_rows + b.num_rows

    bare()
    _, t_bare = timed(bare)
    con.close()
    naive = Naive()
    meta = Path(str(cat)[: -len(".duckdb")]) / "metadata"
    theirs, t_naive = timed(naive.uids, meta, "basic_filter")
    ours = np.load(out)
    same = len(theirs) == len(ours) and all(
        f"{int(a):016x}{int(b):016x}" == u for (a, b), u in zip(ours[["f0", "f1"]].tolist(), theirs))
    print(f"B. basic_filter.sql on {r.pool_rows:,} rows (features cached): {t_ours:.2f}s, kept {r.count:,}")
    print(f"   bare scan of the columns it reads (pool + text_features -> Arrow): {t_bare:.2f}s "
          f"-> ours / bare = {t_ours / t_bare:.2f}x")
    print(f"   DataComp row-wise pandas (LID per caption each run): {t_naive:.1f}s -> {t_naive / t_ours:.0f}x slower; "
          f"uid sets {'EQUAL' if same else 'DIFFERENT'}")


# ---- S: both cores on a pool big enough to amortise starting the workers ----------------------

def part_s(work: Path, rows: int) -> None:
    files = 4
    cat = make_pool(work, f"pool_s_{rows}", files=files, rows_per_file=rows // files, fast=True)
    textfeatures._MODELS = None
    _, w1, c1 = timed_cpu(build_text_features, cat, engine=Engine(workers=1), progress=False, force=True)
    _, w2, c2 = timed_cpu(build_text_features, cat, engine=Engine(workers=2), progress=False, force=True)
    print(f"S. cold text features on {rows:,} generated captions ({files} files, fast captions), load average "
          f"{os.getloadavg()[0]:.1f}: workers=1 {rows / w1:,.0f}/s wall, {c1 / w1:.2f} CPUs busy; workers=2 "
          f"{rows / w2:,.0f}/s wall, {c2 / w2:.2f} CPUs busy -> {w1 / w2:.2f}x wall; "
          f"CPU-seconds per caption {c2 / c1:.2f}x")


# ---- C: WordNet work grows with distinct words --------------------------------------------

def part_c() -> None:
    rng = np.random.default_rng(0)
    root = ensure_wordnet()
    lemmas = [ln.split(" ", 1)[0] for ln in (root / "index.noun").read_text().splitlines() if not ln.startswith(" ")]
    lemmas += [w + "s" for w in lemmas[:20000]]
    vocab_all = np.array(lemmas, dtype=object)
    in21k = load_in21k_offsets()
    print("C. WordNet entity step (entity_flags, fresh cache each row): time follows distinct words")
    for n_captions, v in ((50_000, 1_000), (400_000, 1_000), (50_000, 10_000), (50_000, 80_000)):
        vocab = vocab_all[rng.choice(len(vocab_all), v, replace=False)]
        words = vocab[rng.integers(0, v, size=(n_captions, 6))]
        texts = pa.array([" ".join(r) for r in words])
        m = EntityMatcher(root, in21k)
        t = 0.0
        for start in range(0, n_captions, BATCH_ROWS):  # batches, as the producer reads them
            _, dt = timed(entity_flags, texts[start:start + BATCH_ROWS], m)
            t += dt
        fresh = EntityMatcher(root, in21k)
        _, t_lookup = timed(lambda: [fresh.is_entity(w) for w in set(vocab.tolist())])
        print(f"   {n_captions:>8,} captions x 6 words, vocabulary {v:>6,}: {t:6.2f}s "
              f"({t / n_captions * 1e6:4.1f} us/caption); {m.lookups:>6,} WordNet lookups = {t_lookup:.2f}s "
              f"({t_lookup / max(m.lookups, 1) * 1e6:.0f} us each)")
    naive = Naive()
    vocab = vocab_all[rng.choice(len(vocab_all), 1_000, replace=False)]
    sample = [" ".join(r) for r in vocab[rng.integers(0, 1_000, size=(2_000, 6))]]
    _, t = timed(lambda: [naive.has_entity(s) for s in sample])
    print(f"   DataComp (nltk synsets per word per caption, list membership): {t / len(sample) * 1e6:,.0f} "
          f"us/caption on 2,000 captions of the 1,000-word vocabulary -- does not shrink with repetition")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows of the large pool (part B)")
    ap.add_argument("--parity-rows", type=int, default=100_000, help="rows of the realistic pool (part A)")
    ap.add_argument("--scaling-rows", type=int, default=2_000_000, help="rows of the core-scaling pool (part S)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "text")
    ap.add_argument("--parts", default="ABSC")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CURATE_CACHE", str(args.work / "cache"))
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    if "A" in args.parts:
        part_a(args.work, args.parity_rows)
    if "B" in args.parts:
        part_b(args.work, args.rows)
    if "S" in args.parts:
        part_s(args.work, args.scaling_rows)
    if "C" in args.parts:
        part_c()


if __name__ == "__main__":
    main()
