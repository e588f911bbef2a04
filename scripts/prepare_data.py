"""Build a run's data cache ahead of the run: the tokenizer and the packed train/val tokens that train.py
and scripts/experiment.py then read from cache_dir (.cache) instead of building them first. Useful on a
machine where the GPU's time is what counts (the site corpus takes minutes to tokenize), or on a login
node before a job:

    python scripts/prepare_data.py experiment=e3_context      # make data ARGS=experiment=e3_context
    python scripts/prepare_data.py data=site data.vocab_size=16384

Takes the same Hydra overrides as train.py; only the `data` group (and cache_dir) matter. An experiment
whose runs share one data config (E2, E3, E4: only seq_len, batch size and passkey mix differ, which
the cache does not depend on) is prepared by one call.
"""
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import build_data  # noqa: E402
from training.validate import config_error  # noqa: E402


def main(overrides: list[str]) -> int:
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose("config", overrides=[f"cache_dir={ROOT / '.cache'}", *overrides])
    except HydraException as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        bundle = build_data(cfg.data, cfg.cache_dir)
    except ValueError as e:
        print(f"error: {config_error(e)}", file=sys.stderr)
        return 2
    print(f"data={cfg.data.source}, vocab {bundle.vocab_size}: {len(bundle.train):,} train tokens in "
          f"{bundle.train.num_docs} documents, {len(bundle.val):,} val tokens in {bundle.val.num_docs}; "
          f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
