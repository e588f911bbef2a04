"""Document sources -> a `datasets.Dataset` with string columns `name` and `text`, one row a document.

Four sources, chosen by `data.source`:
- `stdlib`: the Python standard library's own source, present wherever Python is, no network.
- `site`: the Python source of every installed package (the interpreter's site-packages), no network:
  ~10^8 characters where the project's own requirements are installed, enough to train for a while
  without repeating a token; it differs from machine to machine, hence `corpus_fingerprint`.
- `files`: local .txt/.md (one document per file), .json/.jsonl/.parquet (one document per row).
- `hf`: a Hugging Face hub dataset by name (needs the network, or a warm HF cache).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import sysconfig
from itertools import islice
from pathlib import Path

import datasets

# Directories under the stdlib root that are not the standard library's own source.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}
# This project's distribution (pyproject.toml [project] name): an install of it puts our own code into
# site-packages (its packages, or an editable install's finder module), which the site corpus leaves out.
PROJECT_DISTRIBUTION = "longctx"

# File suffix -> the `datasets` packaged builder that reads it.
FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


def stdlib_corpus(doc_unit: str, include_tests: bool, max_docs: int | None) -> datasets.Dataset:
    """The standard library's `.py` files as documents, each file preceded by a `# file: <path>` line.

    doc_unit="package": one document per top-level package directory (all its files, subpackages
    included, in sorted path order), so documents run to 10^5+ tokens (asyncio, email, idlelib, ...);
    a top-level module is its own document. doc_unit="file": one document per file.
    Files that are not UTF-8 (a few deliberate test fixtures) are skipped. max_docs keeps the first N.
    Returns a Dataset with columns name (str: package dir, or the file's path) and text (str).
    """
    skip = STDLIB_SKIP_DIRS if include_tests else STDLIB_SKIP_DIRS | STDLIB_TEST_DIRS
    return _cap(_python_documents([Path(sysconfig.get_paths()["stdlib"])], skip, doc_unit), max_docs)


def site_roots() -> list[Path]:
    """The running interpreter's site-packages: sysconfig's purelib and platlib (one directory in a venv,
    two on distributions that keep compiled packages in lib64), those that exist, each once."""
    paths = sysconfig.get_paths()
    roots = dict.fromkeys(Path(paths[key]).resolve() for key in ("purelib", "platlib"))
    return [root for root in roots if root.is_dir()]


def site_corpus(doc_unit: str, include_tests: bool, max_docs: int | None,
                roots: list[Path] | None = None) -> datasets.Dataset:
    """The `.py` files of every installed package as documents, laid out as stdlib_corpus's: one document
    per top-level package or module (doc_unit="package") or per file ("file"), files in sorted path order,
    each preceded by `# file: <path relative to site-packages>`, documents sorted by name; files that are
    not UTF-8 skipped; include_tests=false leaves out test/ and tests/ directories.

    roots: the site-packages directories to read (default site_roots()). Left out: `__pycache__` and
    `*.dist-info` / `*.egg-info` metadata, and this project's own code when it is installed there (the
    top-level names listed in the RECORD of the PROJECT_DISTRIBUTION distribution), so a model is never
    trained on the code that trains it. The result depends on what is installed: record
    corpus_fingerprint with any result.
    """
    roots = site_roots() if roots is None else [Path(r) for r in roots]
    skip = {"__pycache__"} if include_tests else {"__pycache__"} | STDLIB_TEST_DIRS
    own = set().union(*(_distribution_top_levels(root, PROJECT_DISTRIBUTION) for root in roots))
    return _cap(_python_documents(roots, skip, doc_unit, skip_top=own), max_docs)


def _distribution_top_levels(root: Path, name: str) -> set[str]:
    """Top-level names (package dirs, modules, .pth files) that distribution `name` installed into root."""
    tops = set()
    for dist in importlib.metadata.distributions(path=[str(root)]):
        if (dist.metadata["Name"] or "").lower() == name:
            tops |= {f.parts[0] for f in dist.files or () if f.parts[0] != ".."}
    return tops


def _python_documents(roots: list[Path], skip_dirs: set[str], doc_unit: str,
                      skip_top: set[str] = frozenset()) -> datasets.Dataset:
    """The `.py` files under roots as documents (see stdlib_corpus), directories named in skip_dirs or
    ending in .dist-info/.egg-info pruned, top-level entries named in skip_top left out."""
    docs: dict[str, list[str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            # Pruning in place keeps os.walk out of what is not source (the stdlib's site-packages is often
            # larger than the stdlib itself), and sorting makes the document order and contents reproducible.
            top = Path(dirpath) == root
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not (top and d in skip_top)
                                 and not d.endswith((".dist-info", ".egg-info")))
            for filename in sorted(f for f in filenames if f.endswith(".py") and not (top and f in skip_top)):
                rel = (Path(dirpath) / filename).relative_to(root)
                try:
                    text = (root / rel).read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    continue
                name = rel.parts[0] if doc_unit == "package" else rel.as_posix()
                docs.setdefault(name, []).append(f"# file: {rel.as_posix()}\n{text}")
    names = sorted(docs)
    return datasets.Dataset.from_dict({"name": names, "text": ["\n".join(docs[n]) for n in names]})


def corpus_fingerprint(corpus: datasets.Dataset) -> str:
    """16 hex digits of a sha256 over every document's name and text, in order, each prefixed by its
    length so that no two different corpora hash the same stream. Equal on two machines exactly when
    their documents are: the record of which corpus a result came from (the site corpus varies with
    what is installed). Unlike `datasets`' own fingerprint it depends on nothing but the documents."""
    digest = hashlib.sha256()
    for batch in corpus.select_columns(["name", "text"]).iter(batch_size=64):
        for name, text in zip(batch["name"], batch["text"]):
            for part in (name.encode(), text.encode()):
                digest.update(len(part).to_bytes(8, "little"))
                digest.update(part)
    return digest.hexdigest()[:16]


def resolve_data_files(paths: list[str]) -> tuple[str, list[str]]:
    """Expand paths and globs (`**` allowed) into (builder name, sorted absolute file list).

    Raises ValueError naming `data.paths` when a pattern matches nothing, a suffix is unknown, or
    the files need different builders (text and json in one corpus).
    """
    files = []
    for pattern in paths:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise ValueError(f"data.paths: no file matches {pattern!r}")
        files.extend(os.path.abspath(p) for p in matches)
    builders = set()
    for f in files:
        suffix = Path(f).suffix.lower()
        if suffix not in FILE_BUILDERS:
            raise ValueError(f"data.paths: {f!r} has suffix {suffix!r}; expected one of {sorted(FILE_BUILDERS)}")
        builders.add(FILE_BUILDERS[suffix])
    if len(builders) > 1:
        raise ValueError(f"data.paths: mixes file kinds {sorted(builders)}; use one kind per corpus")
    return builders.pop(), files


def file_corpus(paths: list[str], text_field: str, max_docs: int | None, cache_dir: Path,
                encoding: str = "utf-8") -> datasets.Dataset:
    """Local files as documents: a text file is one document (named by its path), a json/jsonl/parquet
    row is one document (its `text_field` column, named by row index). Text and json files are read
    in `encoding`.

    The Arrow copies `datasets` makes go to `<cache_dir>/hf`, next to our other caches, rather than the
    user's global HF cache; their fingerprint follows the files' paths and mtimes.
    Raises ValueError naming the file when one cannot be read (not in `encoding`, binary, malformed).
    """
    builder, files = resolve_data_files(paths)
    hf_cache = str(cache_dir / "hf")
    # sample_by="document": one row per file, in data_files order, instead of one row per line.
    options = {"text": {"sample_by": "document", "encoding": encoding}, "json": {"encoding": encoding}}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache,
                                   **options.get(builder, {}))
    except Exception as e:  # datasets wraps the reader's error in a DatasetGenerationError naming no file
        bad = _unreadable_file(builder, files, encoding)
        if bad is None:
            raise
        raise ValueError(f"data.paths: {bad}") from e
    if builder == "text":
        ds = _cap(ds, max_docs)
        return ds.add_column("name", files[: len(ds)])
    return _as_documents(ds, text_field, max_docs)


def _unreadable_file(builder: str, files: list[str], encoding: str) -> str | None:
    """The first file the builder cannot read and why, or None. Only run after a failed load, so a
    good corpus is read once, by `datasets`."""
    for f in files:
        if builder == "parquet":
            import pyarrow.parquet as pq
            try:
                pq.ParquetFile(f)
            except Exception as e:
                return f"{f} is not a parquet file ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
            continue
        data = Path(f).read_bytes()
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as e:
            kind = "binary, not text" if b"\x00" in data[:8192] else f"not {encoding} text"
            return (f"{f} is {kind} (byte 0x{data[e.start]:02x} at offset {e.start} does not decode); set "
                    f"data.encoding to the files' encoding (e.g. latin-1) or leave the file out of data.paths")
        if builder == "json":
            lines = text.splitlines() if f.endswith(".jsonl") else [text]
            for i, line in enumerate(lines, 1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as e:
                    where = f"line {i}" if f.endswith(".jsonl") else f"line {e.lineno}"
                    return f"{f} is not valid JSON at {where} ({e.msg})"
    return None


def hub_corpus(name: str, config_name: str | None, split: str, streaming: bool, text_field: str,
               max_docs: int | None) -> datasets.Dataset:
    """A Hugging Face hub dataset as documents (one row each; `text_field` holds the text).

    Streaming reads only the first `max_docs` rows and keeps them in memory; otherwise the dataset is
    downloaded to the user's HF cache (HF_HOME), shared with their other projects.
    """
    if streaming:
        stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
        ds = datasets.Dataset.from_list(list(islice(stream, max_docs)))
    else:
        ds = datasets.load_dataset(name, config_name, split=split)
    return _as_documents(ds, text_field, max_docs)


def _cap(ds: datasets.Dataset, max_docs: int | None) -> datasets.Dataset:
    return ds if max_docs is None or len(ds) <= max_docs else ds.select(range(max_docs))


def _as_documents(ds: datasets.Dataset, text_field: str, max_docs: int | None) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field: column {text_field!r} not in {ds.column_names}")
    ds = _cap(ds, max_docs).select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.add_column("name", [str(i) for i in range(len(ds))])
