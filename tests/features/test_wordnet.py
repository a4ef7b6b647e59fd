"""DataComp's text-entity rule: first WordNet 3.0 synset of each str.split() word (nltk 3.8.1
semantics), offset compared without part of speech against the IN-21k wnid list.

Expected offsets were read by hand from the WordNet 3.0 files (index.*, *.exc) and
timm's imagenet21k_goog_synsets.txt, e.g. ``index.verb: heterodyne v 1 1 @ 1 0 01461646`` and
``n01461646`` (blastula) on line 415 of the wnid list."""

import os

import pytest

from curate.features.wordnet import EntityMatcher, WordNetError, check_wordnet_dir, ensure_wordnet, load_in21k_offsets


@pytest.fixture(scope="module")
def matcher(tmp_path_factory):
    os.environ["CURATE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield EntityMatcher()
    os.environ.pop("CURATE_CACHE", None)


# word, first synset offset (None: no synset), hit -- from the data files, by hand
CASES = [
    ("dog", 2084071, True),          # dog.n.01, n02084071
    ("Dog", 2084071, True),          # nltk lower-cases
    ("dogs", 2084071, True),         # morphy rule s -> ''
    ("mice", 2330245, True),         # noun.exc: mice mouse -> mouse.n.01 n02330245
    ("geese", 1855672, True),        # noun.exc: geese goose -> goose.n.01 n01855672
    ("dogses", 2084071, True),       # nltk 3.8.1 re-applies rules: dogses -> dogs -> dog (3.10 gives none)
    ("dog,", None, False),           # punctuation stays on the word: no synset
    ("the", None, False),
    ("a", 13658027, False),          # angstrom.n.01: a noun, not an IN-21k class
    ("eat", 1168468, False),         # no noun reading: first synset is the verb eat.v.01
    ("heterodyne", 1461646, True),   # verb first (before the adj); offset equals noun n01461646
    ("athletic", 2907656, True),     # adjective offset 02907656 equals noun n02907656 (no POS check)
    ("photo", 3925226, False),       # photograph.n.01 is not an IN-21k class
]


@pytest.mark.parametrize("word,offset,hit", CASES)
def test_first_synset_and_entity(matcher, word, offset, hit):
    assert matcher.first_synset_offset(word) == offset
    assert matcher.is_entity(word) is hit


def test_contains_entity_per_caption(matcher):
    assert matcher.contains_entity("three white mice on a table")
    assert matcher.contains_entity("GEESE\u3000flying")             # \u3000 splits like str.split
    assert not matcher.contains_entity("dog, cat.")                 # punctuation attached
    assert not matcher.contains_entity("")
    assert not matcher.contains_entity("we eat photo")


def test_lookups_scale_with_distinct_words(matcher):
    before = matcher.lookups
    for _ in range(1000):
        matcher.contains_entity("lorem ipsum lorem")  # no hit: every word is looked at
    assert matcher.lookups - before == 2


def test_agrees_with_nltk_where_nltk_did_not_change(matcher):
    """nltk 3.10's synsets() differs from 3.8.1 only when one round of rules finds nothing."""
    from curate.features.wordnet import load_reader

    reader = load_reader(matcher.root)
    for word in ["dog", "mice", "geese", "running", "better", "eat", "athletic", "a", "churches", "wolves"]:
        ss = reader.synsets(word)
        assert matcher.first_synset_offset(word) == (ss[0].offset() if ss else None)


def test_in21k_list():
    offsets = load_in21k_offsets()
    assert len(offsets) == 21843 and 2084071 in offsets


def test_crlf_and_unreadable_dirs_are_rejected(tmp_path, matcher):
    crlf = tmp_path / "crlf"
    crlf.mkdir()
    for name in os.listdir(matcher.root):
        data = (matcher.root / name).read_bytes()
        (crlf / name).write_bytes(data.replace(b"\n", b"\r\n"))
    with pytest.raises(WordNetError, match="CRLF"):
        check_wordnet_dir(crlf)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(matcher.root):
        (broken / name).write_bytes((matcher.root / name).read_bytes())
    (broken / "index.noun").unlink()
    (broken / "index.noun").mkdir()  # present but not a readable file
    with pytest.raises(WordNetError, match="index.noun.*unreadable"):
        check_wordnet_dir(broken)
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    for name in os.listdir(matcher.root):
        (garbled / name).write_bytes((matcher.root / name).read_bytes())
    (garbled / "index.verb").write_text("eat v x y\n")
    os.environ["CURATE_WORDNET_DIR"] = str(garbled)
    try:
        with pytest.raises(WordNetError, match="unreadable"):
            EntityMatcher(ensure_wordnet())
    finally:
        del os.environ["CURATE_WORDNET_DIR"]
