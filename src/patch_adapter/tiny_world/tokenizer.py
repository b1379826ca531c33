"""The tiny world's tokenizer: CLIP's class, with one token per word of the scene vocabulary."""

from __future__ import annotations


def word_tokenizer(words, model_max_length: int = 77):
    """A CLIP tokenizer that keeps each of `words` whole, one token each.

    Byte-level BPE like CLIP's, with merges that build exactly these words: any
    other text still tokenizes, character by character. The merge list is grown
    until every word comes out as one token (a merge added for one word can split
    another, hence the loop).
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    base = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]

    def build(merges):
        vocab = {}
        for token in base + [a + b for a, b in merges]:
            vocab.setdefault(token, len(vocab))
        return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)

    merges: list[tuple[str, str]] = []
    for _ in range(100):
        tokenizer = build(merges)
        split = [pieces for pieces in (tokenizer.tokenize(w) for w in words) if len(pieces) > 1]
        if not split:
            return tokenizer
        merges.extend(dict.fromkeys((pieces[0], pieces[1]) for pieces in split))
    raise RuntimeError("could not build merges that keep every word whole")


def tiny_tokenizer():
    """The tiny backbone's tokenizer: one token per word of the scene vocabulary."""
    from .scenes import VOCABULARY

    return word_tokenizer(VOCABULARY)
