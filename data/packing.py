"""Tokenize a corpus and pack it into flat memory-mapped token files, split into train/val by document.

On-disk layout of `<cache_dir>/tokens-<key>/` (key: corpus fingerprint, tokenizer key, split settings):
    {train,val}_tokens.npy      (N,) uint16 (uint32 when the vocab exceeds 65536): documents back to
                                back, each followed by the EOT token
    {train,val}_doc_starts.npy  (num_docs,) int64: offset of each document's first token
    meta.json                   counts and settings; written last, so its presence marks a complete entry
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer

from data.tokenizer import key_of

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Bump when the layout or the tokenization recipe changes, so stale caches are not reused.
FORMAT_VERSION = 1


class PackedTokens:
    """One split of the packed corpus.

    .tokens      np.memmap (N,) uint16/uint32: the token stream (documents end with EOT)
    .doc_starts  np.ndarray (num_docs,) int64: start offset of each document in .tokens
    len(p)       N, the number of tokens
    """

    def __init__(self, directory: Path, split: str):
        self.tokens = np.load(directory / f"{split}_tokens.npy", mmap_mode="r")
        self.doc_starts = np.load(directory / f"{split}_doc_starts.npy")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i (a view into the memmap, EOT included)."""
        end = self.doc_starts[i + 1] if i + 1 < self.num_docs else len(self.tokens)
        return self.tokens[self.doc_starts[i]:end]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenize_corpus(corpus: datasets.Dataset, tokenizer: Tokenizer, eot_id: int, num_proc: int) -> datasets.Dataset:
    """Corpus -> Dataset with one column `ids` (list of uint16/uint32): each document's tokens + EOT.

    Special-token strings inside a document ("<|endoftext|>" quoted in some source file) are encoded
    as plain text, so the only EOT ids in the stream are the document ends appended here.
    """
    dtype = token_dtype(tokenizer.get_vocab_size())
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's keeps its behaviour
    tokenizer.encode_special_tokens = True

    def encode(batch):
        encodings = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
        return {"ids": [np.append(np.asarray(e.ids, dtype=dtype), dtype.type(eot_id)) for e in encodings]}

    return corpus.map(
        encode,
        batched=True,
        # Package-level documents are up to MBs each: small batches keep shards balanced across processes.
        batch_size=16,
        num_proc=min(num_proc, len(corpus)) if num_proc > 1 else None,
        remove_columns=corpus.column_names,
        desc="tokenizing",
    )


def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random split of document indices: (train, val), each sorted, val non-empty.

    Raises ValueError when there are fewer than 2 documents (no room for both splits).
    """
    if num_docs < 2:
        raise ValueError(f"data: the corpus has {num_docs} document(s); need at least 2 for a train/val split")
    num_val = min(num_docs - 1, max(1, round(val_fraction * num_docs)))
    order = np.random.default_rng(seed).permutation(num_docs)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def _write_split(ids: datasets.Dataset, indices: np.ndarray, lengths: np.ndarray, directory: Path, split: str,
                 dtype: np.dtype) -> None:
    doc_lengths = lengths[indices]
    starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
    out = np.lib.format.open_memmap(directory / f"{split}_tokens.npy", mode="w+", dtype=dtype,
                                    shape=(int(doc_lengths.sum()),))
    offset = 0
    # Arrow batches flatten to one contiguous array each: no Python loop over documents or tokens.
    for batch in ids.select(indices).with_format("arrow").iter(batch_size=1024):
        flat = pc.list_flatten(batch["ids"]).to_numpy()
        out[offset:offset + len(flat)] = flat
        offset += len(flat)
    out.flush()
    np.save(directory / f"{split}_doc_starts.npy", starts)


def pack_corpus(corpus: datasets.Dataset, tokenizer: Tokenizer, tokenizer_key: str, eot_id: int,
                val_fraction: float, seed: int, num_proc: int, cache_dir: Path) -> tuple[PackedTokens, PackedTokens]:
    """Tokenize, split by document and pack `corpus`, or reuse the cached result: (train, val).

    The entry is built in a temporary directory and moved into place with one os.replace, so an
    interrupted or concurrent run never sees a partial cache.
    """
    key = key_of({"corpus": corpus._fingerprint, "tokenizer": tokenizer_key, "val_fraction": val_fraction,
                  "seed": seed, "format": FORMAT_VERSION})
    directory = cache_dir / f"tokens-{key}"
    if (directory / "meta.json").exists():
        log.info("token cache hit: %s", directory)
        return PackedTokens(directory, "train"), PackedTokens(directory, "val")

    train_idx, val_idx = split_documents(len(corpus), val_fraction, seed)
    ids = tokenize_corpus(corpus, tokenizer, eot_id, num_proc)
    lengths = pc.list_value_length(ids.with_format("arrow")["ids"]).to_numpy()
    dtype = token_dtype(tokenizer.get_vocab_size())

    tmp = cache_dir / f".tokens-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, indices in zip(SPLITS, (train_idx, val_idx)):
        _write_split(ids, indices, lengths, tmp, split, dtype)
    meta = {
        "corpus_fingerprint": corpus._fingerprint,
        "tokenizer_key": tokenizer_key,
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": eot_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
        "num_docs": {"train": len(train_idx), "val": len(val_idx)},
        "num_tokens": {"train": int(lengths[train_idx].sum()), "val": int(lengths[val_idx].sum())},
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, directory)
    except OSError:
        # Another process finished the same entry first (a directory can't replace a non-empty one).
        if not (directory / "meta.json").exists():
            raise
        shutil.rmtree(tmp)
    return PackedTokens(directory, "train"), PackedTokens(directory, "val")
