"""The offline tokenizers (``attnpack/toy/tiny.py``): every listed word is exactly one token, any other text still encodes."""

import pytest

from attnpack.toy.tiny import BASE_WORDS, build_clip_tokenizer, build_t5_tokenizer


@pytest.mark.parametrize("build", [build_clip_tokenizer, build_t5_tokenizer])
def test_every_listed_word_is_one_token(build):
    tokenizer = build()
    split = {w: tokenizer.tokenize(w) for w in BASE_WORDS if len(tokenizer.tokenize(w)) != 1}
    assert split == {}  # before the fix, CLIP split "large", "square", "green", "triangle", ... into pieces


@pytest.mark.parametrize("build", [build_clip_tokenizer, build_t5_tokenizer])
def test_unlisted_text_still_encodes_and_decodes(build):
    tokenizer = build()
    ids = tokenizer("a zebra-crossing, 42 times!")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "azebra-crossing,42times!"


def test_words_added_later_keep_earlier_words_whole():
    words = ("are", "large", "argue", "lar")  # "ar" merges first and would split "large" with one chain per word
    tokenizer = build_clip_tokenizer(words)
    assert [len(tokenizer.tokenize(w)) for w in words] == [1, 1, 1, 1]
    assert tokenizer.tokenize("large are") == ["large</w>", "are</w>"]
