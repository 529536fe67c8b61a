"""Tokenizers trained in a test, small and fast to make."""

import json

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers


def chatml_bpe(vocab_size: int = 400) -> HFTokenizer:
    """A byte-level BPE over json's source with ChatML's special tokens: <|endoftext|> (id 0),
    <|im_start|> (1) and <|im_end|> (2)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([json.decoder.__file__], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok
