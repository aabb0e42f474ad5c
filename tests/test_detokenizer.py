import pytest

from gpt2_triton.detokenizer import IncrementalDetokenizer
from gpt2_triton.text import TextCodec


@pytest.fixture(scope="module")
def codec(tiny_model):
    return TextCodec(tiny_model)


def stream(codec, text, stop_words=()):
    detok = IncrementalDetokenizer(codec.decode, stop_words)
    pieces = [detok.add(t) for t in codec.encode(text)]
    pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize(
    "text",
    [
        "The cat walks to the river.  Two  spaces, tabs\tand\nnewlines.",
        "The café in 東京 serves crème brûlée ✓ 🙂",
    ],
)
def test_pieces_join_to_the_text_and_never_split_a_character(codec, text):
    pieces, detok = stream(codec, text)
    assert "".join(pieces) == text == detok.text
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_character_waits_for_its_last_byte(codec):
    ids = codec.encode("東")
    assert len(ids) > 1  # the tiny vocabulary splits it into byte tokens
    detok = IncrementalDetokenizer(codec.decode)
    assert [detok.add(t) for t in ids] == [""] * (len(ids) - 1) + ["東"]


def test_stop_word_is_cut_and_never_half_emitted(codec):
    pieces, detok = stream(codec, "The cat walks. User: hello there", stop_words=["User:"])
    assert detok.stopped and "".join(pieces) == "The cat walks. "
    for i in range(len(pieces)):
        assert not "".join(pieces[: i + 1]).endswith(("U", "Us", "Use", "User"))


def test_text_that_only_looks_like_a_stop_word_prefix_is_released(codec):
    pieces, detok = stream(codec, "The Us army", stop_words=["User:"])
    assert "".join(pieces) == "The Us army" and not detok.stopped


def test_a_stop_word_completed_by_a_half_character_is_cut_at_flush(codec):
    ids = codec.encode("Fine. Q: 東")[:-1]  # the last token is " " + the first bytes of 東
    detok = IncrementalDetokenizer(codec.decode, ["Q: "])
    pieces = [detok.add(t) for t in ids]
    assert not detok.stopped  # the stop word is not whole before the end
    pieces.append(detok.flush())
    assert "".join(pieces) == "Fine. " == detok.text and detok.stopped


def test_flush_releases_a_held_stop_word_start(codec):
    pieces, detok = stream(codec, "The cat. Us", stop_words=["User:"])
    assert "".join(pieces) == "The cat. Us" == detok.text and not detok.stopped
