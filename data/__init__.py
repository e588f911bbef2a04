"""Data pipeline: corpus -> tokenizer -> packed token files -> batch loader; synthetic long-context tasks.

    bundle = build_data(cfg.data, cache_dir)          # cfg.data: the configs/data/*.yaml group
    loader = bundle.loader("train", batch_size=8, seq_len=256, seed=0)
    batch = next(loader)   # input_ids, targets, position_ids (B, T) int64; cu_seqlens (n + 1,) int32

Everything slow is cached under cache_dir (tokenizer-<key>.json, tokens-<key>/), so a second run with
the same corpus and settings starts at once.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from data.corpus import file_corpus, hub_corpus, resolve_data_files, site_corpus, stdlib_corpus
from data.loader import PASSKEY_LENGTHS, BatchLoader
from data.packing import PackedTokens, pack_corpus
from data.tasks import PasskeyTask
from data.tokenizer import SPECIAL_TOKENS, eot_token_id, get_tokenizer

__all__ = ["BatchLoader", "DataBundle", "DataConfig", "PackedTokens", "build_data"]

SOURCES = ("stdlib", "site", "files", "hf")
# the key that chose the documents
_SOURCE_KEY = {"stdlib": "source", "site": "source", "files": "paths", "hf": "name"}
DOC_UNITS = ("package", "file")


@dataclass(frozen=True)
class DataConfig:
    """The `data` config group, validated. Meaning of each key: configs/data/stdlib.yaml."""
    source: str
    doc_unit: str
    include_tests: bool
    paths: list[str]
    text_field: str
    encoding: str
    name: str | None
    config_name: str | None
    split: str
    streaming: bool
    max_docs: int | None
    vocab_size: int
    tokenizer_path: str | None
    tokenizer_train_chars: int | None
    val_fraction: float
    seq_len: int
    batch_size: int
    num_proc: int | None
    doc_masking: bool
    passkey_mix: float
    passkey_lengths: str
    sample_span: int | None
    seed: int

    @classmethod
    def from_cfg(cls, cfg: Any) -> DataConfig:
        """Check every key of `cfg` (DictConfig, mapping or attribute object) before any work is done.

        Raises ValueError naming the offending key (`data.<key>`): unknown, missing or mandatory
        (`???`), wrong type or range, files that don't exist.
        """
        v = _as_dict(cfg)
        names = [f.name for f in fields(cls)]
        for key in v:
            if key not in names:
                raise ValueError(f"data.{key}: unknown key (known: {', '.join(names)})")
        for key in names:
            if key not in v or v[key] == "???":
                raise ValueError(f"data.{key}: missing")
        if isinstance(v["paths"], str):
            v["paths"] = [v["paths"]]
        elif isinstance(v["paths"], Sequence):  # a list, tuple or ListConfig
            v["paths"] = list(v["paths"])

        _check(v["source"] in SOURCES, "source", f"must be one of {SOURCES}, got {v['source']!r}")
        _check(v["doc_unit"] in DOC_UNITS, "doc_unit", f"must be one of {DOC_UNITS}, got {v['doc_unit']!r}")
        for key in ("include_tests", "streaming", "doc_masking"):
            _check(isinstance(v[key], bool), key, f"must be true or false, got {v[key]!r}")
        _check(isinstance(v["paths"], list) and all(isinstance(p, str) for p in v["paths"]), "paths",
               f"must be a list of paths or globs, got {v['paths']!r}")
        for key in ("text_field", "split"):
            _check(isinstance(v[key], str) and v[key] != "", key, f"must be a non-empty string, got {v[key]!r}")
        _check(isinstance(v["encoding"], str) and _is_codec(v["encoding"]), "encoding",
               f"must be a text encoding Python knows (utf-8, latin-1, ...), got {v['encoding']!r}")
        for key in ("name", "config_name", "tokenizer_path"):
            _check(v[key] is None or isinstance(v[key], str), key, f"must be a string or null, got {v[key]!r}")
        for key, low in (("vocab_size", 256 + len(SPECIAL_TOKENS)), ("seq_len", 1), ("batch_size", 1), ("seed", 0)):
            _check(_is_int(v[key]) and v[key] >= low, key, f"must be an integer >= {low}, got {v[key]!r}")
        for key, low in (("max_docs", 2), ("tokenizer_train_chars", 1), ("num_proc", 1)):
            _check(v[key] is None or (_is_int(v[key]) and v[key] >= low), key,
                   f"must be null or an integer >= {low}, got {v[key]!r}")
        _check(_is_number(v["val_fraction"]) and 0 < v["val_fraction"] < 1, "val_fraction",
               f"must be in (0, 1), got {v['val_fraction']!r}")
        _check(_is_number(v["passkey_mix"]) and 0 <= v["passkey_mix"] <= 1, "passkey_mix",
               f"must be in [0, 1], got {v['passkey_mix']!r}")
        _check(v["passkey_lengths"] in PASSKEY_LENGTHS, "passkey_lengths",
               f"must be one of {PASSKEY_LENGTHS}, got {v['passkey_lengths']!r}")
        _check(v["passkey_lengths"] != "mixed" or v["doc_masking"], "passkey_lengths",
               "mixed packs several prompts into a row, which needs data.doc_masking=true (otherwise a "
               "question also sees the other prompts' keys)")
        span = v["sample_span"]
        _check(span is None or (_is_int(span) and span >= 1 and span % v["seq_len"] == 0
                                and (v["batch_size"] * v["seq_len"]) % span == 0), "sample_span",
               f"must be null or a multiple of data.seq_len ({v['seq_len']}) that divides data.batch_size x "
               f"data.seq_len ({v['batch_size'] * v['seq_len']}), got {span!r}")

        if v["source"] == "files":
            _check(len(v["paths"]) > 0, "paths", "source=files needs at least one path")
            resolve_data_files(v["paths"])  # raises ValueError naming data.paths
        if v["source"] == "hf":
            _check(bool(v["name"]), "name", "source=hf needs a dataset name")
            _check(not v["streaming"] or v["max_docs"] is not None, "max_docs",
                   "streaming=true needs max_docs (how many documents to take from the stream)")
        if v["tokenizer_path"] is not None:
            _check(os.path.isfile(v["tokenizer_path"]), "tokenizer_path", f"no file {v['tokenizer_path']!r}")
        return cls(**v)


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        # "???" stays a string here so the check above can name the missing key.
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return dict(vars(cfg))


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"data.{key}: {message}")


def _is_codec(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class DataBundle:
    """What build_data returns: the tokenizer and the packed splits, plus loaders over them."""
    config: DataConfig
    tokenizer: Tokenizer
    eot_id: int
    train: PackedTokens
    val: PackedTokens

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included); the model's embedding needs at least this many."""
        return self.tokenizer.get_vocab_size()

    def check_windows(self, seq_len: int) -> None:
        """Raise ValueError naming the data key to change when a split cannot fill one window of
        seq_len + 1 tokens: before training starts, not at the first evaluation hours later."""
        train, val = self.train, self.val
        if len(train) + len(val) == train.num_docs + val.num_docs:   # every document is its EOT alone
            raise ValueError(f"data.{_SOURCE_KEY[self.config.source]}: the corpus is empty "
                             f"({train.num_docs + val.num_docs} documents, no text in any)")
        for split, packed, key, fix in (
                ("train", train, "seq_len", "shorten data.seq_len or add documents"),
                ("val", val, "val_fraction", "raise data.val_fraction (documents are held out whole) or shorten "
                                             "data.seq_len")):
            if len(packed) < seq_len + 1:
                raise ValueError(f"data.{key}: the {split} split holds {len(packed):,} tokens in {packed.num_docs} "
                                 f"documents, fewer than one window of data.seq_len + 1 = {seq_len + 1:,}; {fix}")

    def loader(self, split: str, batch_size: int, seq_len: int, seed: int, doc_masking: bool = True,
               bucket_boundaries: bool = False) -> BatchLoader:
        """BatchLoader over `split` ("train" or "val"). In the train loader a fraction `data.passkey_mix`
        of the batches are passkey samples; the val loader has none, so val loss stays plain language
        modelling. bucket_boundaries: see BatchLoader."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        mix = self.config.passkey_mix if split == "train" else 0.0
        return BatchLoader(getattr(self, split), batch_size, seq_len, seed, doc_masking=doc_masking,
                           passkey=PasskeyTask(self.tokenizer) if mix > 0 else None, passkey_mix=mix,
                           passkey_lengths=self.config.passkey_lengths, bucket_boundaries=bucket_boundaries,
                           sample_span=self.config.sample_span if split == "train" else None)


def load_corpus(config: DataConfig, cache_dir: Path) -> datasets.Dataset:
    """The configured source as a Dataset of documents (columns name, text)."""
    if config.source == "stdlib":
        return stdlib_corpus(config.doc_unit, config.include_tests, config.max_docs)
    if config.source == "site":
        return site_corpus(config.doc_unit, config.include_tests, config.max_docs)
    if config.source == "files":
        return file_corpus(config.paths, config.text_field, config.max_docs, cache_dir, config.encoding)
    return hub_corpus(config.name, config.config_name, config.split, config.streaming, config.text_field,
                      config.max_docs)


def build_data(cfg: Any, cache_dir: str | os.PathLike) -> DataBundle:
    """Validate `cfg` (the data group), load the corpus, get the tokenizer (trained once, then cached)
    and the packed train/val token files (built once, then cached under `cache_dir`)."""
    config = DataConfig.from_cfg(cfg)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(config, cache_dir)
    tokenizer, tokenizer_key = get_tokenizer(corpus, config.vocab_size, config.tokenizer_train_chars,
                                             config.tokenizer_path, cache_dir)
    eot_id = eot_token_id(tokenizer)
    num_proc = config.num_proc or min(4, os.cpu_count() or 1)
    train, val = pack_corpus(corpus, tokenizer, tokenizer_key, eot_id, config.val_fraction, config.seed,
                             num_proc, cache_dir)
    return DataBundle(config=config, tokenizer=tokenizer, eot_id=eot_id, train=train, val=val)
