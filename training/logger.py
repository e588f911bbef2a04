"""Metrics to <out_dir>/metrics.jsonl (always) and to Weights & Biases (unless logger.mode=none).

wandb is best effort: if it fails to start or to log, the run warns once and goes on without it,
because losing a dashboard must never cost a training run. metrics.jsonl is the record of truth.
Nor may wandb hold a run up: before starting online, its server is asked for any answer within
PROBE_TIMEOUT_S seconds; without one (no network, a firewall) the run logs offline and says so,
instead of sitting in wandb's own retries for minutes before the first step.
"""
import json
import os
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from omegaconf import DictConfig

PROBE_TIMEOUT_S = 5.0


def wandb_mode(mode: str) -> str:
    """The mode wandb runs in. The WANDB_MODE environment variable wins, as wandb users expect; then
    logger.mode; "auto" is online when logged in (WANDB_API_KEY, or `wandb login`'s netrc entry),
    otherwise offline, so a run never stops at wandb's login prompt."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if mode != "auto":
        return mode
    import wandb

    return "online" if os.environ.get("WANDB_API_KEY") or wandb.api.api_key else "offline"


def server_reachable(base_url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the wandb server answers at all (any HTTP status counts) within timeout seconds."""
    try:
        urllib.request.urlopen(base_url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True          # it answered, if only with an error page
    except (OSError, ValueError):
        return False         # refused, unresolvable, no route, or silent past the timeout
    return True


class RunLogger:
    def __init__(self, logger: DictConfig, out_dir: Path, config: dict, active: bool = True):
        """logger: the logger config group; config: the resolved run config, logged to wandb.
        active=False (every rank but 0 of a job of several processes): writes nothing, starts no wandb run,
        so a job has one record however many processes it has; the metrics it is given are the job's."""
        self.jsonl, self.run = None, None
        if not active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if logger.mode != "none":
            self._guard(self._start_wandb, logger, config)

    def _start_wandb(self, logger: DictConfig, config: dict) -> None:
        import wandb

        Path(logger.dir).mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(logger.mode)
        if os.environ.get("WANDB_MODE") and logger.mode not in ("auto", mode):
            print(f"WANDB_MODE={mode} overrides logger.mode={logger.mode}", file=sys.stderr)
        if mode == "online":
            base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
            if not server_reachable(base_url):
                print(f"wandb: {base_url} did not answer within {PROBE_TIMEOUT_S:g} s; logging offline to "
                      f"{logger.dir}/wandb (upload later with `wandb sync`)", file=sys.stderr)
                mode = "offline"
        self.run = wandb.init(project=logger.project, group=logger.group, name=logger.name, dir=logger.dir,
                              config=config, mode=mode)

    def log(self, metrics: dict, step: int) -> None:
        """One JSON line with the step, and the same metrics to wandb at that step."""
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self._guard(self.run.log, metrics, step=step)

    def finish(self, summary: dict) -> None:
        """Put the run's summary (status, peak memory, throughput, ...) in wandb's run table."""
        if self.jsonl is None:
            return
        self.jsonl.close()
        if self.run is not None:
            self._guard(self._finish_wandb, summary)

    def _finish_wandb(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary["status"] == "finished" else 1)
        self.run = None

    def _guard(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # deliberate: see the module docstring
            warnings.warn(f"wandb failed ({type(e).__name__}: {e}); continuing without it, "
                          "metrics still go to metrics.jsonl", stacklevel=2)
            self.run = None
