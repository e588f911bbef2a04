"""scripts/experiment.py end to end on CPU: each experiment's smoke variant (configs/experiment/*_smoke.yaml)
trains its runs through train(), evaluates the checkpoints and writes its report, all under tmp_path;
and train.init_from, the weights-only start that E4's fine-tunes use."""
import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import train as train_module
from training.checkpoint import LATEST, load_checkpoint
from training.validate import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiment", ROOT / "scripts" / "experiment.py")
experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache for the session: the smoke variants share their data config, so it is built once."""
    return tmp_path_factory.mktemp("cache")


def run_smoke(name: str, tmp_path: Path, cache_dir: Path, *overrides: str) -> tuple[Path, dict]:
    """Run `name`'s smoke variant; its report directory and results.json, after the checks every report passes."""
    code = experiment.main([name, "--smoke", "--reports", str(tmp_path / "reports"),
                            "--outputs", str(tmp_path / "outputs"), f"cache_dir={cache_dir}", *overrides])
    assert code == 0
    report_dir = tmp_path / "reports" / f"{name}_smoke"
    report = (report_dir / "report.md").read_text()
    assert "\n|---|" in report                                    # a markdown table
    assert f"python scripts/experiment.py {name} --smoke" in report  # the command
    assert f"python train.py experiment={name}_smoke " in report     # each run's overrides
    assert f"torch: {torch.__version__}" in report and "- device: " in report
    for image in report.split("](")[1:]:                            # every plot it links exists and is a PNG
        png = report_dir / image.split(")")[0]
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000, png
    results = json.loads((report_dir / "results.json").read_text())
    for run in results["runs"]:  # the normal train() path ran and logged
        assert math.isfinite(run["val_ppl"]) and run["wall_clock_s"] > 0
        assert (Path(run["out_dir"]) / "metrics.jsonl").stat().st_size > 0
    return report_dir, results


@pytest.mark.slow
def test_e1_scaling_smoke(tmp_path):
    """E1 trains no runs (so no run_smoke): the context sweep of scripts/bench_context.py on CPU, its report."""
    code = experiment.main(["e1_scaling", "--smoke", "--reports", str(tmp_path / "reports"),
                            "--outputs", str(tmp_path / "outputs")])
    assert code == 0
    report_dir = tmp_path / "reports" / "e1_scaling_smoke"
    report = (report_dir / "report.md").read_text()
    assert "\n|---|" in report and "| config | context | step s | tokens/s |" in report  # the sweep's table
    assert "## Reproduce" in report and "python scripts/experiment.py e1_scaling --smoke" in report
    assert f"torch: {torch.__version__}" in report and "- device: " in report
    for png in ("context_memory.png", "context_speed.png"):                # linked from the report, real PNGs
        assert f"]({png})" in report
        assert (report_dir / png).read_bytes()[:8] == PNG_MAGIC and (report_dir / png).stat().st_size > 1000
    results = json.loads((report_dir / "results.json").read_text())
    configs = ["flash+plan", "flash", "naive"]
    cuda = torch.cuda.is_available()
    # on CPU our kernels' path is the reference; on a GPU the sweep runs the kernels and reads the peak
    assert results["configs"]["flash"]["attention"] == ("flash" if cuda else "reference")
    rows = results["rows"]
    assert [(r["config"], r["seq_len"]) for r in rows] == [(c, n) for c in configs for n in (64, 128, 256)]
    for r in rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["step_s"] > 0, r
        assert r["saved_for_backward_gib"] > 0
        if cuda:
            assert r["peak_gib"] > 0 and r["mfu"] > 0, r
        else:
            assert r["peak_gib"] is None and r["mfu"] is None, r                 # CPU: no peak, no MFU
    # the memory plan keeps less for backward than the same kernels without it, at the longest context
    kept = {r["config"]: r["saved_for_backward_gib"] for r in rows if r["seq_len"] == 256}
    assert kept["flash+plan"] < kept["flash"]


@pytest.mark.slow
def test_e2_passkey_smoke(tmp_path, cache_dir):
    report_dir, results = run_smoke("e2_passkey", tmp_path, cache_dir)
    contexts = [run["seq_len"] for run in results["runs"]]
    assert contexts == [128, 256, 512]
    assert len({run["tokens"] for run in results["runs"]}) == 1   # the same token budget at every context
    for seq_len in contexts:
        grid = results["accuracy"][str(seq_len)]                   # rows depths, columns lengths
        assert len(grid) == len(results["depths"]) and all(len(row) == len(results["lengths"]) for row in grid)
        assert all(0 <= acc <= 1 for row in grid for acc in row)
        tokens = results["token_accuracy"][str(seq_len)]          # per length, mean over depths
        assert len(tokens) == len(results["lengths"]) and all(0 <= acc <= 1 for acc in tokens)
        assert (report_dir / f"passkey_ctx{seq_len}.png").exists()
    assert "Answer tokens right" in (report_dir / "report.md").read_text()


@pytest.mark.slow
def test_e3_context_smoke(tmp_path, cache_dir):
    report_dir, results = run_smoke("e3_context", tmp_path, cache_dir)
    runs = results["runs"]
    assert [run["seq_len"] * run["batch_size"] for run in runs] == [512] * 3  # batch shrinks as context grows
    assert all(math.isfinite(ppl) for ppl in results["val_ppl_long"].values())
    for curve in results["loss_by_position"].values():
        assert len(curve) == len(results["position_edges"]) - 1
        assert all(loss is None or math.isfinite(loss) for loss in curve) and curve[0] is not None
    assert (report_dir / "loss_by_position.png").exists()


@pytest.mark.slow
def test_e4_extend_smoke(tmp_path, cache_dir):
    report_dir, results = run_smoke("e4_extend", tmp_path, cache_dir)
    assert [run["run"] for run in results["runs"]] == ["short128", "finetune_pi", "finetune_theta", "finetune_yarn"]
    short, *tuned = results["runs"]
    for run in tuned:  # fine-tuned at the long context from the short run's weights
        assert run["seq_len"] == 1024 and run["steps"] == 5
        assert f"train.init_from={short['checkpoint']}" in run["overrides"]
    assert load_checkpoint(tuned[0]["checkpoint"])["model_config"]["rope_scaling_factor"] == 8.0
    assert load_checkpoint(tuned[1]["checkpoint"])["model_config"]["rope_theta"] == 100000.0
    yarn = load_checkpoint(tuned[2]["checkpoint"])["model_config"]
    assert (yarn["rope_scaling"], yarn["rope_scaling_factor"], yarn["rope_original_seq_len"]) == ("yarn", 8.0, 128)
    variants = results["variants"]
    assert len(variants) == 8 and [v["length"] for v in variants] == [128] + [1024] * 7
    for v in variants:
        assert 0 <= v["passkey_acc"] <= 1 and all(0 <= acc <= 1 for acc in v["by_depth"])
        assert math.isfinite(v["val_ppl"])
    assert (report_dir / "extension.png").exists()


# --- errors ----------------------------------------------------------------------------------------------

def test_unknown_experiment_is_one_line(capsys):
    assert experiment.main(["e9_nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown experiment 'e9_nope'" in err[0] and "e2_passkey" in err[0]


@pytest.mark.parametrize("override, key", [
    ("train.lr=abc", "train.lr"),                       # validate(), before any data is built
    ("train.no_such_key=1", "train.no_such_key"),        # Hydra's own composition error
    ("runner.tokens_per_step=1000", "runner.tokens_per_step"),  # not a multiple of the contexts
])
def test_config_error_is_one_line(tmp_path, cache_dir, capsys, override, key):
    code = experiment.main(["e3_context_smoke", "--reports", str(tmp_path), "--outputs", str(tmp_path),
                            f"cache_dir={cache_dir}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("config error: ") and key in err[-1]


def test_e1_runner_overrides(tmp_path, capsys):
    """The sweep's parameters are Hydra overrides of `runner`; a name the sweep does not know is a config error."""
    x = experiment.Experiment("e1_scaling", ["runner.max=262144", "runner.configs=[flash+plan,naive]"],
                              tmp_path, tmp_path, "command")
    assert x.runner.max == 262144 and list(x.runner.configs) == ["flash+plan", "naive"]
    code = experiment.main(["e1_scaling_smoke", "--reports", str(tmp_path), "--outputs", str(tmp_path),
                            "runner.configs=[flash,nope]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("config error: runner.configs: unknown 'nope'")


def test_context_sweep_records_oom_and_goes_on(tmp_path, monkeypatch):
    """Out of memory ends one configuration's doubling as a result; the sweep goes on with the next."""
    bench = experiment.bench_context
    real = bench.run_point

    def run_point(name, model_name, seq_len, steps, device, compile=False):
        if name == "naive" and seq_len > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(name, model_name, seq_len, steps, device, compile)

    monkeypatch.setattr(bench, "run_point", run_point)
    logged = []
    rows = bench.sweep(["naive", "sdpa_flash"], "tiny", 64, 256, 1, 1, 1024, 60.0, torch.device("cpu"), tmp_path,
                       log=logged.append)
    assert logged == rows
    assert [(r["config"], r["seq_len"], r["status"]) for r in rows] == [
        ("naive", 64, "ok"), ("naive", 128, "OOM"), ("sdpa_flash", 64, "ok"), ("sdpa_flash", 128, "ok"),
        ("sdpa_flash", 256, "ok")]
    assert "| naive | 128 | - | - |" in bench.markdown_table(rows) and "| OOM |" in bench.markdown_table(rows)
    assert (tmp_path / "naive" / "metrics.jsonl").read_text().count("\n") == 2  # every point, OOM too


@pytest.mark.parametrize("compile, mode, name", [(True, "default", "naive+compile"),
                                                 ("reduce-overhead", "reduce-overhead", "naive+reduce-overhead")])
def test_context_sweep_compile(tmp_path, monkeypatch, compile, mode, name):
    """--compile [MODE]: each point's model goes through torch.compile in that mode (dynamo + AOT autograd
    here, inductor's C++ build is slow on CPU), its training steps run, and rows and runs are named
    <config>+compile (<config>+MODE)."""
    compiled = []
    real = torch.compile

    def spy(model, mode=None, **kwargs):
        compiled.append((type(model).__name__, mode))
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    rows = experiment.bench_context.sweep(["naive"], "tiny", 64, 64, 2, 2, 1024, 60.0, torch.device("cpu"), tmp_path,
                                          compile=compile)
    assert compiled == [("GPT", mode)]
    assert [(r["config"], r["status"]) for r in rows] == [(name, "ok")]
    assert rows[0]["tokens_per_s"] > 0 and (tmp_path / name / "metrics.jsonl").exists()


def test_make_experiment_passes_name_smoke_and_overrides():
    # under `make test` the parent make's MAKEFLAGS / MAKELEVEL would leak into this make
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "-n", "experiment", "NAME=e2_passkey", "SMOKE=1", "train.max_steps=5"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
    assert "scripts/experiment.py e2_passkey --smoke" in out and "'train.max_steps=5'" in out
    assert "NAME=" not in out and "SMOKE=" not in out


# --- train.init_from ------------------------------------------------------------------------------------

@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """The e3 smoke config (a tiny CPU model) as one plain run into tmp_path/<run>."""
    def make(*overrides, run="run"):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            return compose("config", overrides=["experiment=e3_context_smoke", f"out_dir={tmp_path / run}",
                                                f"cache_dir={cache_dir}", "data.seq_len=64", "train.max_steps=4",
                                                "train.eval_every=4", "train.ckpt_every=4", *overrides])
    return make


def test_init_from_loads_the_weights_only(make_cfg, tmp_path):
    train_module.train(make_cfg(run="first"))
    first = load_checkpoint(tmp_path / "first" / "checkpoints" / LATEST)
    # one step at a negligible learning rate: the weights are still the first run's
    train_module.train(make_cfg(f"train.init_from={tmp_path / 'first' / 'checkpoints' / LATEST}", "train.max_steps=1",
                                "train.warmup_steps=0", "train.lr=1e-9", "train.min_lr=1e-9",
                                "model.rope_scaling_factor=2.0", run="second"))
    second = load_checkpoint(tmp_path / "second" / "checkpoints" / LATEST)
    for name, weight in first["model"].items():
        torch.testing.assert_close(second["model"][name], weight, atol=1e-6, rtol=0)
    assert second["step"] == 1 and second["loader"]["step"] == 1  # a fresh start otherwise
    assert second["model_config"]["rope_scaling_factor"] == 2.0


def test_init_from_errors_name_the_key(make_cfg, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("train.init_from=/no/such/checkpoint.pt"))
    assert e.value.key == "train.init_from"
    train_module.train(make_cfg(run="first"))
    with pytest.raises(ConfigError, match="size mismatch") as e:  # another model shape
        train_module.train(make_cfg(f"train.init_from={tmp_path / 'first' / 'checkpoints' / LATEST}",
                                    "model.d_model=64", run="second"))
    assert e.value.key == "train.init_from"
