"""data/: corpus, tokenizer, packing and its cache, BatchLoader, synthetic tasks, config validation.

CPU only and offline: the stdlib corpus capped with max_docs, small vocabularies, caches in tmp_path.
"""

import dataclasses
import json
import sysconfig
import tomllib
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import data
from data import packing, tokenizer as tokenizer_mod
from data.corpus import (PROJECT_DISTRIBUTION, corpus_fingerprint, file_corpus, hub_corpus, site_corpus, site_roots,
                         stdlib_corpus)
from data.packing import split_documents, token_dtype
from data.tasks import PasskeyTask, mqar_accuracy, mqar_batch, passkey_scores
from data.tokenizer import EOT, get_tokenizer, training_texts

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs" / "data")
SMALL = ["max_docs=30", "vocab_size=512"]


def data_cfg(overrides=(), name="stdlib"):
    """The real data group file, composed with overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def fail(*args, **kwargs):
    raise AssertionError("should have been served from the cache")


@pytest.fixture(scope="module")
def package_corpus():
    return stdlib_corpus("package", include_tests=False, max_docs=None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small stdlib bundle (30 package-level documents, vocab 512) and the cache it was built in."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = data_cfg(SMALL)
    return data.build_data(cfg, cache), cfg, cache


# --- corpus -----------------------------------------------------------------------------------------

def test_stdlib_package_documents_are_long(package_corpus):
    names = package_corpus["name"][:]
    lengths = [len(t) for t in package_corpus["text"][:]]
    assert package_corpus.column_names == ["name", "text"]
    assert len(names) == len(set(names)) > 100
    assert {"asyncio", "email", "json", "os.py"} <= set(names)
    assert not any("site-packages" in n for n in names)
    assert max(lengths) > 400_000  # ~10^5 tokens of code
    asyncio = package_corpus[names.index("asyncio")]["text"]
    assert asyncio.startswith("# file: asyncio/__init__.py\n")
    assert "# file: asyncio/tasks.py\n" in asyncio


def test_stdlib_file_documents():
    files = stdlib_corpus("file", include_tests=False, max_docs=None)
    names = files["name"][:]
    assert "asyncio/tasks.py" in names and "os.py" in names
    assert not any("/test/" in f"/{n}" or "/tests/" in f"/{n}" for n in names)
    assert len(stdlib_corpus("file", include_tests=False, max_docs=7)) == 7


@pytest.fixture
def site_packages(tmp_path):
    """Two fake site-packages directories (purelib, platlib): packages, modules, a test suite, a stale cache,
    a file that is not UTF-8, distribution metadata, and this project installed (editable finder + package)."""
    pure, plat = tmp_path / "purelib", tmp_path / "platlib"
    files = {
        pure / "pkg" / "__init__.py": "A = 1\n",
        pure / "pkg" / "sub" / "mod.py": "B = 2\n",
        pure / "pkg" / "tests" / "test_pkg.py": "def test_a(): pass\n",
        pure / "pkg" / "__pycache__" / "stale.py": "STALE\n",
        pure / "pkg" / "notes.txt": "not source\n",
        pure / "alone.py": "C = 3\n",
        pure / "other-1.0.dist-info" / "METADATA": "Metadata-Version: 2.1\nName: other\nVersion: 1.0\n",
        pure / "other-1.0.dist-info" / "hook.py": "METADATA\n",
        pure / "model" / "__init__.py": "OURS = 1\n",
        pure / "__editable___longctx_0_1_0_finder.py": "MAPPING = {'model': '/home/someone/longctx/model'}\n",
        pure / "longctx-0.1.0.dist-info" / "METADATA": "Metadata-Version: 2.1\nName: longctx\nVersion: 0.1.0\n",
        pure / "longctx-0.1.0.dist-info" / "RECORD": "model/__init__.py,,\n__editable___longctx_0_1_0_finder.py,,\n"
                                                     "longctx-0.1.0.dist-info/METADATA,,\n",
        plat / "pkg" / "ext.py": "D = 4\n",
        plat / "binmod.py": "E = 5\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (pure / "pkg" / "latin.py").write_bytes(b"S = '\xe9'\n")     # latin-1: skipped, its package stays
    (pure / "latin_only.py").write_bytes(b"# caf\xe9\n")          # a module that is not UTF-8: no document
    return [pure, plat]


def test_site_package_documents(site_packages):
    corpus = site_corpus("package", include_tests=True, max_docs=None, roots=site_packages)
    assert corpus["name"][:] == ["alone.py", "binmod.py", "pkg"]      # sorted; our own code and metadata left out
    pkg = corpus["text"][2]
    assert pkg == ("# file: pkg/__init__.py\nA = 1\n\n# file: pkg/sub/mod.py\nB = 2\n\n"
                   "# file: pkg/tests/test_pkg.py\ndef test_a(): pass\n\n# file: pkg/ext.py\nD = 4\n")
    assert corpus["text"][0] == "# file: alone.py\nC = 3\n"
    no_tests = site_corpus("package", include_tests=False, max_docs=None, roots=site_packages)
    assert "test_pkg" not in no_tests["text"][2] and "# file: pkg/sub/mod.py" in no_tests["text"][2]
    files = site_corpus("file", include_tests=True, max_docs=2, roots=site_packages)
    assert files["name"][:] == ["alone.py", "binmod.py"]
    # the same files, the same corpus; a changed file, another fingerprint
    assert corpus_fingerprint(site_corpus("package", True, None, roots=site_packages)) == corpus_fingerprint(corpus)
    (site_packages[0] / "pkg" / "sub" / "mod.py").write_text("B = 3\n")
    assert corpus_fingerprint(site_corpus("package", True, None, roots=site_packages)) != corpus_fingerprint(corpus)


def test_site_roots_are_the_interpreters_site_packages():
    paths = sysconfig.get_paths()
    assert site_roots() == list(dict.fromkeys(Path(paths[k]).resolve() for k in ("purelib", "platlib")))
    # the project's distribution name is pyproject's: what site_corpus leaves out when it is installed
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == PROJECT_DISTRIBUTION


def test_site_source_builds(site_packages, tmp_path, monkeypatch):
    """data=site (configs/data/site.yaml): the installed packages' source, through build_data."""
    monkeypatch.setattr(data.corpus, "site_roots", lambda: site_packages)
    bundle = data.build_data(data_cfg(["vocab_size=300", "val_fraction=0.3"], name="site"), tmp_path / "cache")
    assert bundle.config.source == "site" and bundle.config.include_tests
    assert bundle.train.num_docs + bundle.val.num_docs == 3
    texts = [bundle.tokenizer.decode(split.doc(i).tolist()) for split in (bundle.train, bundle.val)
             for i in range(split.num_docs)]
    assert any(t.startswith("# file: pkg/__init__.py\n") for t in texts) and not any("OURS" in t for t in texts)


def test_corpus_fingerprint_is_of_names_and_texts():
    def fingerprint(names, texts):
        return corpus_fingerprint(datasets.Dataset.from_dict({"name": names, "text": texts}))
    base = fingerprint(["a", "b"], ["xy", "z"])
    assert base == fingerprint(["a", "b"], ["xy", "z"]) and len(base) == 16
    # a moved boundary, a renamed document, another order: each another corpus
    assert len({base, fingerprint(["a", "b"], ["x", "yz"]), fingerprint(["a", "c"], ["xy", "z"]),
                fingerprint(["b", "a"], ["z", "xy"])}) == 4


# --- tokenizer ----------------------------------------------------------------------------------------

def test_tokenizer_roundtrip_and_cache(tmp_path, monkeypatch, package_corpus):
    corpus = package_corpus.select(range(20))
    tok, key = get_tokenizer(corpus, 400, 300_000, None, tmp_path)
    assert tok.get_vocab_size() == 400 and tok.token_to_id(EOT) == 0
    text = corpus[3]["text"] + "\n\tünïcödé 世界 ∑ <- bytes the corpus never saw\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert (tmp_path / f"tokenizer-{key}.json").exists()

    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", fail)
    again, key_again = get_tokenizer(corpus, 400, 300_000, None, tmp_path)
    assert key_again == key and again.encode(text).ids == tok.encode(text).ids
    with pytest.raises(AssertionError, match="cache"):
        get_tokenizer(corpus, 500, 300_000, None, tmp_path)


def test_training_texts_cap(package_corpus):
    texts = list(training_texts(package_corpus, 1000))
    assert sum(map(len, texts)) == 1000
    assert texts == [package_corpus[0]["text"][:1000]]


# --- packing ------------------------------------------------------------------------------------------

def test_split_by_document():
    train, val = split_documents(100, 0.1, seed=3)
    assert len(val) == 10 and len(set(train) | set(val)) == 100 and not set(train) & set(val)
    assert np.array_equal(val, split_documents(100, 0.1, seed=3)[1])
    assert len(split_documents(5, 0.01, seed=0)[1]) == 1  # at least one val document
    with pytest.raises(ValueError):
        split_documents(1, 0.1, seed=0)


def test_packed_splits_hold_each_document_once(built):
    bundle, cfg, _ = built
    corpus = stdlib_corpus("package", include_tests=False, max_docs=30)
    train_idx, val_idx = split_documents(len(corpus), cfg.val_fraction, cfg.seed)
    for packed, indices in ((bundle.train, train_idx), (bundle.val, val_idx)):
        assert packed.tokens.dtype == np.uint16 and isinstance(packed.tokens, np.memmap)
        assert packed.num_docs == len(indices) and packed.doc_starts[0] == 0
        for j, i in enumerate(indices):
            expected = bundle.tokenizer.encode(corpus[int(i)]["text"]).ids + [bundle.eot_id]
            assert packed.doc(j).tolist() == expected
    assert bundle.train.num_docs + bundle.val.num_docs == 30 and bundle.val.num_docs >= 1


def test_literal_eot_in_a_document_is_text(built):
    tok, eot = built[0].tokenizer, built[0].eot_id
    corpus = datasets.Dataset.from_dict({"name": ["a"], "text": ["x = '<|endoftext|>'\n"]})
    ids = packing.tokenize_corpus(corpus, tok, eot, num_proc=1)["ids"][0]
    assert ids[-1] == eot and eot not in ids[:-1]
    assert tok.decode(ids[:-1]) == corpus[0]["text"]
    assert tok.encode("<|endoftext|>").ids == [eot]  # the caller's tokenizer is left as it was


def test_second_build_hits_the_cache(built, monkeypatch):
    bundle, cfg, cache = built
    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", fail)
    monkeypatch.setattr(packing, "tokenize_corpus", fail)
    again = data.build_data(cfg, cache)
    assert np.array_equal(again.train.tokens, bundle.train.tokens)
    assert np.array_equal(again.val.doc_starts, bundle.val.doc_starts)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    meta = json.loads(next(cache.glob("tokens-*/meta.json")).read_text())
    assert meta["num_tokens"]["train"] == len(bundle.train)


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


# --- loader -------------------------------------------------------------------------------------------

def check_batch(batch, eot_id, B, T):
    x, y, pos, cu = batch["input_ids"], batch["targets"], batch["position_ids"], batch["cu_seqlens"]
    assert x.shape == y.shape == pos.shape == (B, T)
    assert x.dtype == y.dtype == pos.dtype == torch.int64 and cu.dtype == torch.int32
    assert (x >= 0).all()
    # EOT ends every document (and appears nowhere else in the stdlib): the token after it starts the
    # next document, so its target is ignored and positions restart there.
    after_eot = torch.zeros_like(x, dtype=torch.bool)
    after_eot[:, 1:] = x[:, :-1] == eot_id
    assert torch.equal(y == -100, x == eot_id)
    assert torch.equal(y[:, :-1][y[:, :-1] != -100], x[:, 1:][y[:, :-1] != -100])
    starts = after_eot.clone()
    starts[:, 0] = True
    assert torch.equal(pos == 0, starts)
    assert torch.equal(cu[:-1].long(), torch.nonzero(starts.flatten()).flatten()) and cu[-1] == B * T
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert torch.equal(pos.flatten()[a:b], torch.arange(b - a))
    return int(after_eot.sum())


def test_loader_batches_respect_documents(built):
    bundle, _, _ = built
    # ~500K sampled tokens: enough that windows cross boundaries even where (another Python's stdlib)
    # a few huge package documents dominate the 30
    loader = bundle.loader("train", batch_size=8, seq_len=4096, seed=0)
    crossings = sum(check_batch(next(loader), bundle.eot_id, 8, 4096) for _ in range(16))
    assert crossings > 0  # the windows did cross document boundaries


def test_loader_without_doc_masking(built):
    bundle, _, _ = built
    batch = next(bundle.loader("val", batch_size=3, seq_len=64, seed=1, doc_masking=False))
    assert (batch["targets"] != -100).all()
    assert torch.equal(batch["position_ids"], torch.arange(64).expand(3, 64))
    assert batch["cu_seqlens"].tolist() == [0, 64, 128, 192]


def test_bucketed_boundaries(built):
    # bucket_boundaries (train.py sets it under CUDA graphs, which record a graph per input shape): cu_seqlens
    # padded to a power-of-two length with empty trailing segments, everything else the same batch
    bundle, _, _ = built
    B, T = 8, 1024
    exact = bundle.loader("train", batch_size=B, seq_len=T, seed=0)
    padded = bundle.loader("train", batch_size=B, seq_len=T, seed=0, bucket_boundaries=True)
    lengths, buckets = set(), set()
    for _ in range(32):
        a, b = next(exact), next(padded)
        assert all(torch.equal(a[k], b[k]) for k in a if k != "cu_seqlens")
        n, m = a["cu_seqlens"].numel(), b["cu_seqlens"].numel()
        assert m >= n and m & (m - 1) == 0 and torch.equal(b["cu_seqlens"][:n], a["cu_seqlens"])
        assert (b["cu_seqlens"][n:] == B * T).all()
        lengths.add(n)
        buckets.add(m)
    assert len(buckets) < len(lengths)   # fewer shapes


def test_loader_resume_is_exact(built):
    bundle, _, _ = built
    loader = bundle.loader("train", batch_size=2, seq_len=128, seed=7)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = bundle.loader("train", batch_size=2, seq_len=128, seed=0)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(3))):
        assert all(torch.equal(want[k], got[k]) for k in want)
    other_seed = next(bundle.loader("train", batch_size=2, seq_len=128, seed=8))
    assert not torch.equal(other_seed["input_ids"], next(bundle.loader("train", 2, 128, seed=7))["input_ids"])


def test_sample_span_cuts_spans_into_rows(built):
    """data.sample_span: rows come in runs of span / T consecutive windows of one span, the batch otherwise a
    plain one (documents, targets, positions checked as for any batch); span = T is the plain sampling."""
    bundle, _, _ = built
    B, T, span = 8, 64, 256
    spans = dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, sample_span=span))
    loader = spans.loader("train", batch_size=B, seq_len=T, seed=3)
    tokens = np.asarray(bundle.train.tokens).astype(np.int64)
    places = set()
    for _ in range(4):
        batch = next(loader)
        check_batch(batch, bundle.eot_id, B, T)
        x = batch["input_ids"].view(B // (span // T), span).numpy()   # each group of 4 rows: one run of text
        for g in x:
            candidates = np.flatnonzero(tokens[:len(tokens) - span] == g[0])
            at = [int(i) for i in candidates if np.array_equal(tokens[i:i + span], g)]
            assert at, "a group of rows is not one contiguous span of the corpus"
            places.add(at[0])
    assert len(places) > 1
    assert next(spans.loader("val", batch_size=B, seq_len=T, seed=3))["input_ids"].shape == (B, T)  # val: plain
    same = dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, sample_span=T))
    plain, one = bundle.loader("train", B, T, seed=5), same.loader("train", B, T, seed=5)
    for _ in range(3):
        a, b = next(plain), next(one)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="sample_span"):
        data.BatchLoader(bundle.train, batch_size=2, seq_len=64, seed=0, sample_span=96)


def test_loader_rejects_too_long_windows(built):
    bundle, _, _ = built
    with pytest.raises(ValueError, match="seq_len"):
        bundle.loader("val", batch_size=1, seq_len=len(bundle.val), seed=0)


def test_passkey_mix_in(built):
    bundle, _, _ = built
    mixed = dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, passkey_mix=1.0))
    batch = next(mixed.loader("train", batch_size=3, seq_len=256, seed=0))
    assert torch.equal(batch["position_ids"], torch.arange(256).expand(3, 256))
    assert batch["cu_seqlens"].tolist() == [0, 256, 512, 768]
    for x, y in zip(batch["input_ids"], batch["targets"]):
        text = bundle.tokenizer.decode(x.tolist())
        answer = bundle.tokenizer.decode(y[y != -100].tolist())
        key = int(answer)
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
        full = bundle.tokenizer.decode(x.tolist() + [y[-1].item()])
        assert full.endswith(f"What is the pass key? The pass key is {key}")
        assert (y != -100).nonzero().max() == 255  # answer tokens end the row
    val = next(mixed.loader("val", batch_size=2, seq_len=64, seed=0))  # never mixed into val
    assert "pass key" not in bundle.tokenizer.decode(val["input_ids"][0].tolist())


def test_passkey_mixed_lengths_pack_whole_prompts(built):
    # passkey_lengths=mixed: each row holds several prompts of different lengths, each its own document
    # (positions restart, cu_seqlens bound it), each ending with its own key as the only targets
    bundle, _, _ = built
    mixed = dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, passkey_mix=1.0,
                                                                    passkey_lengths="mixed"))
    loader = mixed.loader("train", batch_size=3, seq_len=512, seed=0)
    shortest = PasskeyTask(bundle.tokenizer).min_length - 1
    spans = []
    for step in range(4):
        batch = loader.batch(step)
        x, y, pos = batch["input_ids"].flatten(), batch["targets"].flatten(), batch["position_ids"].flatten()
        cu = batch["cu_seqlens"].tolist()
        assert cu[-1] == 3 * 512 and {0, 512, 1024} <= set(cu)   # every row starts a document too
        for a, b in zip(cu[:-1], cu[1:]):
            spans.append(b - a)
            assert b - a >= shortest and torch.equal(pos[a:b], torch.arange(b - a))
            labelled = (y[a:b] != -100).nonzero().flatten()
            assert labelled.max() == b - a - 1                    # the answer ends the document
            key = int(bundle.tokenizer.decode(y[a:b][labelled].tolist()))
            text = bundle.tokenizer.decode(x[a:b].tolist() + [y[b - 1].item()])
            assert f"The pass key is {key}. Remember it." in text and text.endswith(f"The pass key is {key}")
    assert len(spans) > 12 and min(spans) < 256 < max(spans)   # several prompts a row, short and long


def test_passkey_mix_is_the_share_of_the_loss(built):
    # The loss is a mean over a batch's targets: a passkey row (a few answer targets) inside a corpus
    # batch (T targets a row) would weigh ~nothing (E2 at 1K with half the rows: 0.3% of the loss, and
    # accuracy 0 everywhere). passkey_mix must be the fraction of the loss spent on retrieval.
    bundle, _, _ = built
    mixed = dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, passkey_mix=0.5))
    loader = mixed.loader("train", batch_size=4, seq_len=256, seed=0)
    shares, mixed_batches = [], 0
    for step in range(40):
        batch = loader.batch(step)
        labelled = batch["targets"] != -100
        passkey_rows = labelled.sum(1) < 16  # only the answer tokens are labelled
        shares.append((labelled[passkey_rows].sum() / labelled.sum()).item())
        mixed_batches += bool(passkey_rows.any() and not passkey_rows.all())
    assert 0.3 <= np.mean(shares) <= 0.7, f"passkey answers carry {np.mean(shares):.1%} of the loss"
    assert mixed_batches == 0  # a batch is all passkey or all corpus
    plain = dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, passkey_mix=0.0))
    assert all((plain.loader("train", 4, 256, seed=0).batch(s)["targets"] != -100).sum(1).min() > 16
               for s in range(10))


# --- local files ----------------------------------------------------------------------------------------

def test_jsonl_source_builds(tmp_path):
    docs = [f"document {i}: " + " ".join(f"word{j}" for j in range(50 + i)) for i in range(6)]
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "a.jsonl").write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    cfg = data_cfg([f"paths=[{corpus_dir}/*.jsonl]", "text_field=content", "vocab_size=300", "val_fraction=0.2"],
                   name="files")
    bundle = data.build_data(cfg, tmp_path / "cache")
    assert bundle.train.num_docs + bundle.val.num_docs == 6 and bundle.val.num_docs == 1
    assert bundle.tokenizer.decode(bundle.val.doc(0).tolist()) in docs

    # The trained tokenizer file works as a pretrained one: same ids, a fresh token cache entry.
    path = next((tmp_path / "cache").glob("tokenizer-*.json"))
    pretrained = data.build_data(data_cfg([f"paths=[{corpus_dir}/*.jsonl]", "text_field=content",
                                           "val_fraction=0.2", f"tokenizer_path={path}"], name="files"),
                                 tmp_path / "cache")
    assert np.array_equal(pretrained.train.tokens, bundle.train.tokens)
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 2


def test_text_files_are_one_document_each(tmp_path):
    texts = ["first file\nwith two lines\n", "second file\n", "third\n\n\nwith blank lines\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    corpus = file_corpus([str(tmp_path / "*.txt")], "text", None, tmp_path / "cache")
    assert corpus["text"][:] == texts
    assert corpus["name"][:] == [str(tmp_path / f"{i}.txt") for i in range(3)]
    with pytest.raises(ValueError, match=r"data\.paths"):
        file_corpus([str(tmp_path / "*.csv")], "text", None, tmp_path / "cache")


def test_json_without_the_text_field(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"data\.text_field"):
        file_corpus([str(tmp_path / "a.json")], "text", None, tmp_path / "cache")


def test_hub_source_streaming_reads_max_docs(tmp_path, monkeypatch):
    # A local directory stands in for a hub dataset name: the same load_dataset call, no network.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"story": f"story {i}"}) + "\n" for i in range(10)))
    corpus = hub_corpus(str(tmp_path / "ds"), None, "train", True, "story", 4)
    assert corpus["text"][:] == [f"story {i}" for i in range(4)] and corpus["name"][:] == ["0", "1", "2", "3"]


# --- synthetic tasks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_sample_places_the_key_at_depth(built, depth):
    tok = built[0].tokenizer
    task = PasskeyTask(tok)
    sample = task.sample(1000, depth, np.random.default_rng(0), key=31337)
    ids = sample.input_ids
    assert ids.dtype == np.int64 and ids.shape == (1000,)
    text = tok.decode(ids.tolist())
    assert text.startswith("A pass key is hidden")
    assert "The pass key is 31337. Remember it. 31337 is the pass key." in text
    assert text.endswith("What is the pass key? The pass key is 31337")
    assert tok.decode(ids[sample.answer_positions].tolist()) == " 31337"
    assert tok.decode(ids[sample.needle_start:].tolist()).startswith(" The pass key is 31337.")
    # Filler between intro and question: the needle sits at `depth` of it, give or take a sentence.
    answer_len = len(sample.answer_positions)
    needle_len = sum(map(len, task.needle)) + 2 * answer_len
    filler_len = 1000 - len(task.intro) - needle_len - len(task.question) - answer_len
    sentence = max(map(len, task.filler))
    assert abs(sample.needle_start - len(task.intro) - depth * filler_len) <= sentence


def test_passkey_sample_too_short(built):
    with pytest.raises(ValueError, match="length"):
        PasskeyTask(built[0].tokenizer).sample(20, 0.5, np.random.default_rng(0))


def test_passkey_accuracy_oracle_and_random(built):
    tok = built[0].tokenizer
    V = tok.get_vocab_size()

    def oracle(input_ids):  # puts all mass on the true next token
        return torch.nn.functional.one_hot(input_ids.roll(-1, dims=1), V).float()

    gen = torch.Generator().manual_seed(0)

    def random_model(input_ids):
        return torch.randn(*input_ids.shape, V, generator=gen)

    depths = [0.0, 0.5, 1.0]
    assert passkey_scores(oracle, tok, 300, depths, n_trials=4, seed=0) == {d: (1.0, 1.0) for d in depths}
    assert all(key <= 0.25 for key, _ in passkey_scores(random_model, tok, 300, depths, n_trials=4, seed=0).values())

    def last_token_wrong(input_ids):  # right on every answer token but the last (the key's last token)
        logits = oracle(input_ids)
        logits[0, -2] = logits[0, -2].roll(1)
        return logits
    scores = passkey_scores(last_token_wrong, tok, 300, depths, n_trials=4, seed=0)
    assert all(key == 0.0 and 0.0 < token < 1.0 for key, token in scores.values()), scores


def test_mqar_batch_and_accuracy():
    V, T, N = 64, 64, 8
    batch = mqar_batch(batch_size=5, seq_len=T, num_pairs=N, vocab_size=V, seed=0)
    x, y = batch["input_ids"], batch["targets"]
    assert x.shape == y.shape == (5, T) and x.dtype == y.dtype == torch.int64
    assert ((x >= 0) & (x < V)).all()
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:2 * N:2], row_x[1:2 * N:2]
        assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
        assert len(set(keys.tolist())) == N
        queries = (row_y != -100).nonzero().flatten()
        assert len(queries) == N and (queries >= 2 * N).all() and (queries % 2 == 0).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(row_x[queries].tolist()) == sorted(pairs)
        assert all(pairs[row_x[q].item()] == row_y[q].item() for q in queries)

    oracle_logits = torch.nn.functional.one_hot(y.clamp(min=0), V).float()
    assert mqar_accuracy(oracle_logits, y) == 1.0
    assert mqar_accuracy(torch.randn(5, T, V, generator=torch.Generator().manual_seed(0)), y) < 0.2
    with pytest.raises(ValueError, match="seq_len"):
        mqar_batch(batch_size=1, seq_len=20, num_pairs=8, vocab_size=V, seed=0)


# --- config validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,key", [
    ("stdlib", ["source=bogus"], "data.source"),
    ("stdlib", ["doc_unit=line"], "data.doc_unit"),
    ("stdlib", ["vocab_size=200"], "data.vocab_size"),
    ("stdlib", ["val_fraction=1.5"], "data.val_fraction"),
    ("stdlib", ["max_docs=1"], "data.max_docs"),
    ("stdlib", ["passkey_mix=2"], "data.passkey_mix"),
    ("stdlib", ["passkey_lengths=long"], "data.passkey_lengths"),
    ("stdlib", ["passkey_lengths=mixed", "doc_masking=false"], "data.passkey_lengths"),
    ("stdlib", ["doc_masking=maybe"], "data.doc_masking"),
    ("stdlib", ["sample_span=100"], "data.sample_span"),           # not a multiple of seq_len
    ("stdlib", ["sample_span=1000000000"], "data.sample_span"),    # more than a batch holds
    ("stdlib", ["tokenizer_path=/nonexistent/tokenizer.json"], "data.tokenizer_path"),
    ("stdlib", ["+colour=blue"], "data.colour"),
    ("site", ["include_tests=maybe"], "data.include_tests"),
    ("site", ["doc_unit=module"], "data.doc_unit"),
    ("files", [], "data.paths"),
    ("files", ["paths=[/nonexistent/*.jsonl]"], "data.paths"),
    ("hf", [], "data.name"),
    ("hf", ["name=some/dataset", "max_docs=null"], "data.max_docs"),
])
def test_bad_config_names_the_key(tmp_path, name, overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        data.build_data(data_cfg(overrides, name=name), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # rejected before any work


def test_attribute_object_config(tmp_path):
    values = dict(data_cfg(SMALL))
    assert data.DataConfig.from_cfg(SimpleNamespace(**values)) == data.DataConfig.from_cfg(data_cfg(SMALL))
    values.pop("seed")
    with pytest.raises(ValueError, match=r"data\.seed: missing"):
        data.build_data(SimpleNamespace(**values), tmp_path)
