"""Tests of stop-string matching over streamed text deltas, and of holding back possible stop prefixes."""

import random

import pytest

from llmapi.errors import RequestError
from llmapi.tokenizer import StopStringMatcher, find_stop_string


def test_find_only_in_the_new_region():
    text = "abc STOP def"
    assert find_stop_string(text, 3, ["STOP"]) is None  # it ended in older text: already handled
    assert find_stop_string(text, 9, ["STOP"]) == ("STOP", "abc ")
    assert find_stop_string(text, 9, ["STOP"], include_stop_str_in_output=True) == ("STOP", "abc STOP")
    # A stop string that began in older text and ends in the new region.
    assert find_stop_string(text, 6, ["STOP"]) == ("STOP", "abc ")


def test_find_earliest_of_several():
    text = "one END two STOP"
    assert find_stop_string(text, len(text), ["STOP", "END"]) == ("END", "one ")
    # The one that completes first wins, whatever the list order or the delta split.
    assert find_stop_string("xabcd", 5, ["xabcd", "bc"]) == ("bc", "xa")
    assert find_stop_string("xabc", 4, ["abc", "xabc"], True) == ("xabc", "xabc")


def test_feed_holds_back_possible_prefix():
    m = StopStringMatcher(["<END>"])
    assert m.feed("hello <") == ("hello ", None)
    assert m.feed("EN") == ("", None)
    assert m.feed("X more") == ("<ENX more", None)  # not a stop after all: released
    assert m.feed(" <E") == (" ", None)
    assert m.feed("ND> tail") == ("", "<END>")
    assert m.matched == "<END>"
    assert m.feed("ignored") == ("", None)


def test_feed_include_stop_str():
    m = StopStringMatcher(["<END>"], include_stop_str_in_output=True)
    assert m.feed("ab<EN") == ("ab", None)
    assert m.feed("D>cd") == ("<END>", "<END>")


def test_final_releases_held_text():
    m = StopStringMatcher(["stop"])
    assert m.feed("we st") == ("we ", None)
    assert m.feed("o", final=True) == ("sto", None)


def test_stop_in_one_delta_with_earlier_text():
    m = StopStringMatcher(["\n\n", "User:"])
    assert m.feed("Answer.\n\nUser: hi") == ("Answer.", "\n\n")


@pytest.mark.parametrize("include", [False, True])
def test_streamed_text_never_shows_part_of_a_matching_stop(include):
    rng = random.Random(0)
    alphabet = "ab<>/ "
    for _ in range(2000):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        m = StopStringMatcher(stops, include)
        streamed, matched, i = "", None, 0
        while i < len(text) and matched is None:
            n = rng.randint(1, 4)
            piece, matched = m.feed(text[i:i + n], final=i + n >= len(text))
            # Whatever was streamed must stay a prefix of the final output.
            streamed += piece
            i += n
        # Expected: cut at the stop string that completes first in the whole text.
        whole = find_stop_string(text, len(text), stops, include)
        ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if ends:
            end, start, stop = min(ends)
            assert matched == stop and whole == (stop, text[:end if include else start])
            assert streamed == whole[1]
        else:
            assert matched is None and streamed == text


def test_empty_stop_string_is_rejected():
    with pytest.raises(RequestError):
        StopStringMatcher(["ok", ""])
