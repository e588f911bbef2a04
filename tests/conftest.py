"""Test setup: on a machine without CUDA the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels (at import of ``kernels``),
so it is set here, before any test module imports them. On a GPU every cached launch is checked against the
JIT's own choice of compiled kernel (kernels/dispatch.py), so the whole suite tests the launch keys.
"""
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LONGCTX_CHECK_LAUNCH_CACHE", "1")


def interpreter_trouble() -> str | None:
    """Why Triton's interpreter cannot run our kernels in this environment, or None. Triton 3.6's interpreter
    calls int() on 1-element arrays (a tl.range bound), which NumPy >= 2.5 refuses (deprecated since 1.25); the
    GPU image pairs Triton 3.6 with NumPy 2.5.2. requirements.txt's Triton 3.7.1 has no such call."""
    import numpy
    import triton
    from kernels.dispatch import version
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 5):
        return (f"Triton {triton.__version__}'s interpreter fails under NumPy {numpy.__version__} (int() of a "
                "1-element array); Triton >= 3.7 or NumPy < 2.5 runs these")
    return None


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- train.py on CPU with the real configs, shrunk (tests/test_train.py, tests/test_faults.py) ----------

ROOT = Path(__file__).resolve().parents[1]
SHRINK = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32",
    # sdpa's math kernel: the fastest exact backend on a CPU (auto would run the Triton interpreter here)
    "model.attention=sdpa", "model.sdpa_backend=math",
    "data.seq_len=32", "data.batch_size=2", "data.max_docs=12", "data.vocab_size=320",
    "data.tokenizer_train_chars=200000", "data.num_proc=1",
    "train.lr=1e-2", "train.min_lr=1e-3", "train.warmup_steps=2", "train.max_steps=8", "train.log_every=1",
    "train.eval_every=4", "train.eval_batches=2", "train.ckpt_every=4", "train.sample_tokens=8",
    "logger=none",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache for the session: the tokenizer and token files are built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """The real configs composed with the shrinking overrides, then `overrides`; run dir in tmp_path."""
    def make(*overrides, run="run"):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            return compose("config", overrides=[f"out_dir={tmp_path / run}", f"cache_dir={cache_dir}",
                                                *SHRINK, *overrides])
    return make


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No API key anywhere, and wandb's own files under tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a wandb entry
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no Sentry reports, which would need the network
