"""A byte-level BPE tokenizer trained on the corpus, saved as an ordinary Hugging Face tokenizer.

Byte-level so that any text encodes (a user may type anything into the demo), BPE trained on the
corpus so that the words it uses, capital names in particular, are one or a few tokens
(" Nairobi" is one token): a per-token annotation then marks the whole wrong capital, or its
first token, as the span rules expect (docs/design.md, "Spans"). The GPT-2 conventions are kept: one special token
"<|endoftext|>" serves as EOS, BOS and PAD, nothing is added to encoded text, and a word carries
its leading space (" Nairobi"). Offsets are character offsets into the text (return_offsets_mapping
works), which the policy server uses for token spans.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train on `texts`; the vocabulary stops growing early when the corpus has few words."""
    assert 256 < vocab_size <= 8192, f"vocab_size must be in (256, 8192], got {vocab_size}"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps a token's leading space inside its span (" Nairobi" -> [i, i+8)),
    # so the spans of all tokens tile the text without gaps.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The `tokenizers` object as a transformers tokenizer with its special tokens named."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,  # byte-level: nothing is unknown
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text, spaces included
        model_max_length=None,  # set by the builder to the model's context
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(str(folder))
    folder = Path(folder)
    # Name the generic fast tokenizer class (loads in transformers 4 and 5 alike) and write the
    # special tokens map that transformers 5 no longer writes but older loaders read.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
