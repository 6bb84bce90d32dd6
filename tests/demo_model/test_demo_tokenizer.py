"""The demo tokenizer: loads with AutoTokenizer, offsets tile the text, ids decode back to it."""

import json

import pytest
from transformers import AutoTokenizer

from demo_model.corpus import COUNTRIES, CorpusConfig, generate
from demo_model.tokenizer import EOS, save_tokenizer, train_tokenizer

TEXTS = [
    "The capital of Kenya is Nairobi.",
    "Lima, the capital of Peru, is a busy city.",
    "Bogotá is the capital of Colombia.",
    "Reykjavík and Yaoundé and São Paulo",
    "  two leading spaces, trailing  ",
    "line one\nline two\ttab",
    "emoji 🙂 outside the BMP 𝔘 and CJK 北京",
    "The capital of Atlantis is Poseidonia.",  # words the corpus never saw
    "x",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    corpus = generate(CorpusConfig(seed=0, repeats=4))
    tok = train_tokenizer(corpus.texts, vocab_size=2048)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out, model_max_length=64)
    return out


@pytest.fixture(scope="module")
def tok(folder):
    return AutoTokenizer.from_pretrained(str(folder))


def test_files_and_special_tokens(folder, tok):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / f).is_file(), f
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special == {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS
    assert tok.eos_token_id == tok.convert_tokens_to_ids(EOS)
    assert tok.model_max_length == 64
    assert 256 < len(tok) <= 2048
    # nothing is added around encoded text: prompts go to the model as they are
    assert tok("The capital")["input_ids"] == tok.encode("The capital", add_special_tokens=False)
    assert EOS not in tok.convert_ids_to_tokens(tok("The capital")["input_ids"])


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_round_trip(tok, text):
    enc = tok(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert tok.decode(ids) == text
    assert len(offsets) == len(ids)
    # offsets are code-point spans that cover the text in order without gaps; a character split
    # into several byte tokens gives each of them that character's span
    covered = set()
    prev_end = 0
    for start, end in offsets:
        assert 0 <= start < end <= len(text), (start, end)
        assert start <= prev_end, f"gap before {(start, end)} in {text!r}"
        prev_end = max(prev_end, end)
        covered.update(range(start, end))
    assert covered == set(range(len(text)))
    # the pieces decoded one by one rebuild the text wherever a token is whole characters
    whole = [(s, e, i) for (s, e), i in zip(offsets, ids, strict=True) if tok.decode([i]) == text[s:e]]
    assert len(whole) >= len(ids) // 2


def test_capitals_and_countries_are_few_tokens(tok):
    for country, capital, _, _ in COUNTRIES:
        for name in (capital, country):
            n = len(tok.encode(" " + name, add_special_tokens=False))
            assert n <= 3, f"{name!r} is {n} tokens"
    assert len(tok.encode(" Nairobi", add_special_tokens=False)) == 1
    assert len(tok.encode(" Ottawa", add_special_tokens=False)) == 1


def test_same_corpus_same_tokenizer(tmp_path):
    texts = generate(CorpusConfig(seed=0, repeats=2)).texts
    a, b = train_tokenizer(texts), train_tokenizer(texts)
    assert a.get_vocab() == b.get_vocab()
    assert a("The capital of Kenya is Nairobi.")["input_ids"] == b("The capital of Kenya is Nairobi.")["input_ids"]
