"""Byte-level BPE tokenizer trained on the corpus (cached on disk), or a pretrained tokenizer.json."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]
# GPT-2 style: no space is invented before the first word, so decode(encode(text)) == text exactly.
ADD_PREFIX_SPACE = False
# Pretrained tokenizer files name their end-of-document token in different ways.
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>")


def key_of(obj) -> str:
    """Short stable hash of a JSON-serialisable object, used to name cache entries."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def training_texts(corpus: datasets.Dataset, max_chars: int | None) -> Iterator[str]:
    """Document texts in corpus order, stopping after `max_chars` characters in all (the last one cut).

    The cap bounds training time on big corpora; BPE merge statistics settle long before 20 MB of text.
    """
    budget = max_chars
    for batch in corpus.select_columns(["text"]).iter(batch_size=64):
        for text in batch["text"]:
            if budget is not None:
                text = text[:budget]
                budget -= len(text)
            yield text
            if budget == 0:
                return


def train_tokenizer(texts: Iterator[str], vocab_size: int, num_texts: int | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, all 256 bytes in the
    alphabet so any text encodes) with `<|endoftext|>` as its only special token (id 0).

    texts: an iterator of strings; num_texts: its length, for the progress bar only.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=ADD_PREFIX_SPACE)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = tqdm(texts, total=num_texts, desc=f"training tokenizer (vocab {vocab_size})", unit="doc")
    tokenizer.train_from_iterator(texts, trainer=trainer, length=num_texts)
    return tokenizer


def get_tokenizer(corpus: datasets.Dataset, vocab_size: int, train_chars: int | None,
                  tokenizer_path: str | None, cache_dir: Path) -> tuple[Tokenizer, str]:
    """The tokenizer for this run and a key identifying it (for keying the token cache).

    With `tokenizer_path`, that file is loaded and its key is a hash of its bytes. Otherwise a BPE is
    trained on `corpus` and cached at `<cache_dir>/tokenizer-<key>.json`, where key hashes the corpus
    fingerprint, vocab_size, the training-character cap and the tokenizer recipe; a cache hit skips
    training.
    """
    if tokenizer_path is not None:
        return Tokenizer.from_file(tokenizer_path), hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()[:16]
    key = key_of({
        "corpus": corpus._fingerprint,
        "vocab_size": vocab_size,
        "train_chars": train_chars,
        "recipe": {"model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": ADD_PREFIX_SPACE,
                   "special_tokens": SPECIAL_TOKENS},
    })
    path = cache_dir / f"tokenizer-{key}.json"
    if path.exists():
        log.info("tokenizer cache hit: %s", path)
        return Tokenizer.from_file(str(path)), key
    tokenizer = train_tokenizer(training_texts(corpus, train_chars), vocab_size, num_texts=len(corpus))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent run never reads a half-written file
    return tokenizer, key


def eot_token_id(tokenizer: Tokenizer) -> int:
    """Id of the end-of-document token appended to every document. Raises ValueError if there is none."""
    for name in EOT_NAMES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ValueError(f"data.tokenizer_path: tokenizer has no end-of-document token (looked for {EOT_NAMES})")
