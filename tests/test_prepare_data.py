"""scripts/prepare_data.py builds the cache that train.py then reads, and refuses bad keys in one line."""
import subprocess
import sys

from conftest import ROOT


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_builds_the_cache_train_reads(tmp_path):
    cache = tmp_path / "cache"
    r = run("experiment=e3_context_smoke", f"cache_dir={cache}")
    assert r.returncode == 0, r.stderr
    assert "train tokens" in r.stdout and "val tokens" in r.stdout
    built = sorted(p.name for p in cache.iterdir())
    assert any(n.startswith("tokenizer-") for n in built) and any(n.startswith("tokens-") for n in built)
    again = run("experiment=e3_context_smoke", f"cache_dir={cache}")   # a second call reads, builds nothing new
    assert again.returncode == 0 and sorted(p.name for p in cache.iterdir()) == built


def test_bad_key_is_one_line(tmp_path):
    r = run("data.vocab_size=x", f"cache_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "data.vocab_size" in r.stderr
    r = run("nosuchkey=1", f"cache_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nosuchkey" in r.stderr
