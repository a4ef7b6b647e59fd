"""Caption measures with DataComp's definitions: words = Python str.split(), characters = code
points, fastText tokens = Dictionary::readWord (splits on ' ' \\n \\r \\t \\v \\f \\0; each newline
is a '</s>' token of its own). Expected values are counted by hand, then the whitespace rule is
checked against str.split() for every Unicode code point."""

import sys

import pyarrow as pa
import pytest

from curate.features.text import caption_counts, split_words

# text, n_words, n_chars, n_tokens_fasttext -- counted by hand
CASES = [
    ("", 0, 0, 0),
    ("   ", 0, 3, 0),
    ("a dog", 2, 5, 2),
    ("a\ndog", 2, 5, 3),              # a </s> dog
    ("a\tdog", 2, 5, 2),
    ("a \u3000\x85\t\u2028b", 2, 7, 3),  # a mixed run of separators is one gap (fastText: a, \u3000\x85, \u2028b)
    ("a\u3000dog", 2, 5, 1),          # ideographic space: Python splits, fastText does not
    ("a\xa0dog", 2, 5, 1),            # no-break space: same
    ("a\x85dog", 2, 5, 1),            # NEL: same
    ("a\u200bdog", 1, 5, 1),          # zero-width space is not whitespace for either
    ("\n", 0, 1, 1),                  # </s>
    ("\n\n", 0, 2, 2),
    (" a \n\n b ", 2, 8, 4),          # a </s> </s> b
    ("dog\r\ncat", 2, 8, 3),          # \r separates, \n adds </s>
    ("x\x00y", 1, 3, 2),              # NUL: a fastText separator, not Python whitespace
    ("\x1c\x1d", 0, 2, 1),            # file/group separators: Python whitespace only
    ("a\x0bb\x0cc", 3, 5, 3),         # \v \f: both
    ("日本語 テキスト", 2, 8, 2),       # code points, not bytes
    ("😀 dog", 2, 5, 2),
    ("big dog", 2, 7, 2),             # 2 words: fails basic_filter's > 2
    ("a big dog", 3, 9, 3),
    ("dogs!", 1, 5, 1),               # 5 chars: fails > 5
    ("dogs!!", 1, 6, 1),
]


@pytest.mark.parametrize("text,words,chars,tokens", CASES)
def test_caption_counts_hand_worked(text, words, chars, tokens):
    got = caption_counts(pa.array([text]))
    assert (got["n_words"][0], got["n_chars"][0], got["n_tokens_fasttext"][0]) == (words, chars, tokens)
    # the hand counts are the reference definitions
    assert len(text.split()) == words and len(text) == chars


def test_fasttext_tokenize_agrees_on_the_cases():
    fasttext = pytest.importorskip("fasttext")
    for text, _, _, tokens in CASES:
        assert len(fasttext.tokenize(text)) == tokens, repr(text)


def test_fasttext_token_count_every_ascii_separator():
    fasttext = pytest.importorskip("fasttext")
    texts = [f"ab{chr(c)}cd{chr(c)}{chr(c)}e" for c in range(128)]
    got = caption_counts(pa.array(texts))["n_tokens_fasttext"]
    assert list(got) == [len(fasttext.tokenize(t)) for t in texts]


def test_word_split_matches_str_split_for_every_code_point():
    points = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    texts = pa.array([f"a{chr(c)}b" for c in points])
    got = caption_counts(texts)["n_words"]
    expected = [len(f"a{chr(c)}b".split()) for c in points]
    bad = [hex(c) for c, g, e in zip(points, got, expected) if g != e]
    assert not bad
    assert sum(e == 2 for e in expected) == 29  # the 29 code points str.isspace() accepts


def test_split_words_keeps_punctuation_and_order():
    words, parents = split_words(pa.array(["  Dogs, and\u3000mice! ", "", "geese"]))
    assert words.to_pylist() == ["Dogs,", "and", "mice!", "geese"]
    assert list(parents) == [0, 0, 0, 2]
