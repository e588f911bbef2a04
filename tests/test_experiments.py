"""scripts/experiment.py end to end on CPU: each experiment's smoke variant (configs/experiment/*_smoke.yaml)
trains its runs through train(), evaluates the checkpoints and writes results.json and the report built
from it, all under tmp_path; the report rebuilt by --report-only; and train.init_from, the weights-only
start that E4's fine-tunes use."""
import copy
import importlib.util
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import train as train_module
from data.corpus import corpus_fingerprint, stdlib_corpus
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
    args = [name, "--smoke", "--reports", str(tmp_path / "reports")]
    code = experiment.main([*args, "--outputs", str(tmp_path / "outputs"), f"cache_dir={cache_dir}", *overrides])
    assert code == 0
    report_dir = tmp_path / "reports" / f"{name}_smoke"
    report = (report_dir / "report.md").read_text()
    assert "\n|---|" in report                                    # a markdown table
    assert f"python scripts/experiment.py {name} --smoke" in report  # the command
    assert f"python train.py experiment={name}_smoke " in report     # each run's overrides
    assert f"torch: {torch.__version__}" in report and "- device: " in report
    # no machine paths: outputs and checkpoints are named relative to the repository (../../tmp/... here);
    # what the command line gave (the test's absolute directories) is shown as it was given
    rest = report
    for given in (f"cache_dir={cache_dir}", str(tmp_path / "reports"), str(tmp_path / "outputs")):
        rest = rest.replace(given, "")
    assert not re.search(rf"(?<![\w.])({re.escape(str(tmp_path))}|{re.escape(str(experiment.ROOT))})", rest)
    for image in report.split("](")[1:]:                            # every plot it links exists and is a PNG
        png = report_dir / image.split(")")[0]
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000, png
    results = json.loads((report_dir / "results.json").read_text())
    assert results["format"] == experiment.FORMAT and results["experiment"] == f"{name}_smoke"
    for run in results["runs"]:  # the normal train() path ran and logged
        assert math.isfinite(run["val_ppl"]) and run["wall_clock_s"] > 0
        assert not Path(run["out_dir"]).is_absolute()
        assert (experiment.ROOT / run["out_dir"] / "metrics.jsonl").stat().st_size > 0
    check_corpus(results["corpus"], report)

    # the report is a function of results.json alone: rebuilt without training, it is the same file
    (report_dir / "report.md").unlink()
    for png in report_dir.glob("*.png"):
        png.unlink()
    assert experiment.main([*args, "--report-only"]) == 0
    assert (report_dir / "report.md").read_text() == report
    assert all((report_dir / image.split(")")[0]).exists() for image in report.split("](")[1:])
    return report_dir, results


def check_corpus(corpus: dict, report: str) -> None:
    """The smoke variants' corpus (12 stdlib package documents), as results.json and the report record it."""
    documents = stdlib_corpus("package", include_tests=False, max_docs=12)
    assert corpus["source"] == "stdlib" and corpus["documents"] == 12
    assert corpus["fingerprint"] == corpus_fingerprint(documents)
    assert corpus["characters"] == sum(map(len, documents["text"]))
    longest = corpus["longest"]
    assert [d["tokens"] for d in longest] == sorted((d["tokens"] for d in longest), reverse=True)
    assert {d["name"] for d in longest} <= set(documents["name"]) and {d["split"] for d in longest} <= {"train", "val"}
    # every document is a train or a val one: the tokens of both splits, each document with its EOT
    assert sum(corpus["tokens"].values()) > sum(d["tokens"] for d in longest)
    assert f"Fingerprint `{corpus['fingerprint']}`" in report and f"| {longest[0]['name']} |" in report


def check_identical_tokens(results: dict, summaries: list[dict]) -> None:
    """Every model scored the same val targets: one digest, the evaluation's token count, the same bins."""
    ev = results["eval"]
    assert len({s["digest"] for s in summaries}) == 1 and len(summaries) > 1
    assert all(s["tokens"] == ev["tokens"] == sum(s["tokens_by_bin"]) for s in summaries)
    assert len({tuple(s["tokens_by_bin"]) for s in summaries}) == 1
    for s in summaries:
        assert len(s["loss_by_bin"]) == len(ev["edges"]) - 1 and math.isfinite(s["loss"])
        assert all(loss is None or math.isfinite(loss) for loss in s["loss_by_bin"]) and s["loss_by_bin"][0] is not None


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
    configs = ["flash+plan", "flash", "naive", "sdpa_cudnn+bp", "flash+plan+docs", "flex+bp+docs"]
    cuda = torch.cuda.is_available()
    # on CPU our kernels' path is the reference; on a GPU the sweep runs the kernels and reads the peak
    assert results["configs"]["flash"]["attention"] == ("flash" if cuda else "reference")
    # the baselines are rows of the same run: PyTorch's best practice (SDPA cuDNN, or on a CPU SDPA's CPU
    # kernel, every block checkpointed, 16K loss tiles) and FlexAttention on packed documents
    bp = results["configs"]["sdpa_cudnn+bp"]
    assert (bp["attention"], bp["sdpa_backend"], bp["memory_plan"]) == ("sdpa", "cudnn" if cuda else "flash",
                                                                      ["block", 0, 16384])
    assert "train.activation_checkpointing=block" in bp["train_overrides"]
    flex = results["configs"]["flex+bp+docs"]
    assert flex["attention"] == "flex" and flex["documents"] and flex["train_overrides"] is None
    assert results["doc_len"] == 48
    rows = results["rows"]
    if not cuda:   # FlexAttention has no CPU backward: one skipped row, and the sweep goes on
        skipped = [r for r in rows if r["config"] == "flex+bp+docs"]
        assert len(skipped) == 1 and skipped[0]["status"].startswith("skipped: FlexAttention"), skipped
        rows = [r for r in rows if r is not skipped[0]]
        configs.remove("flex+bp+docs")
        assert "skipped: FlexAttention" in report
    assert "PyTorch's best practice" in report and "FlexAttention" in report
    assert "`sdpa_cudnn+bp`: `model.attention=sdpa model.sdpa_backend=cudnn" in report   # as train.py settings
    assert [(r["config"], r["seq_len"]) for r in rows] == [(c, n) for c in configs for n in (64, 128, 256)]
    assert all(r["documents"] > 1 for r in rows if r["config"].endswith("+docs"))
    for r in rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["step_s"] > 0, r
        # CPU: the bytes of the saved tensors, exact. CUDA: the allocator's difference across the first forward,
        # which at these KB sizes also sees buffers freed inside it (one smoke row on the H200 read -0.0009 GiB)
        assert r["saved_for_backward_gib"] > (-0.01 if cuda else 0), r
        if cuda:
            assert r["peak_gib"] > 0 and r["mfu"] > 0, r
        else:
            assert r["peak_gib"] is None and r["mfu"] is None, r                 # CPU: no peak, no MFU
    # the memory plan keeps less for backward than the same kernels without it, at the longest context
    kept = {r["config"]: r["saved_for_backward_gib"] for r in rows if r["seq_len"] == 256}
    assert kept["flash+plan"] < kept["flash"]


@pytest.mark.slow
def test_e1_resume_takes_swept_configurations(tmp_path, monkeypatch, capsys):
    """E1 killed in its second configuration, continued with --resume: the first configuration's rows come from
    its record (not swept again), the sweep goes on from the second, and the report says which rows were taken;
    a damaged record is swept again."""
    real, swept, killed = experiment.bench_context.sweep, [], []

    def dies_in_config_2(configs, *args, **kwargs):
        swept.append(configs)
        if len(swept) == 2 and not killed:
            killed.append(configs)
            raise Killed
        return real(configs, *args, **kwargs)
    monkeypatch.setattr(experiment.bench_context, "sweep", dies_in_config_2)
    args = ["e1_scaling", "--smoke", "--reports", str(tmp_path / "reports"), "--outputs", str(tmp_path / "outputs"),
            "runner.configs=[naive,sdpa_flash,sdpa_cudnn]"]   # the cheap ones on a CPU
    with pytest.raises(Killed):
        experiment.main(args)
    [runs_dir] = (tmp_path / "outputs" / "e1_scaling_smoke").iterdir()
    first = json.loads((runs_dir / "naive" / experiment.RUN_RECORD).read_text())
    assert [row["config"] for row in first["rows"]] == ["naive"] * 3   # 64, 128, 256
    assert not (runs_dir / "sdpa_flash" / experiment.RUN_RECORD).exists()
    swept.clear()
    assert experiment.main([*args, "--resume", str(runs_dir)]) == 0
    assert swept == [["sdpa_flash"], ["sdpa_cudnn"]]
    assert "naive swept before (--resume): not measured again" in capsys.readouterr().out
    results = json.loads((tmp_path / "reports" / "e1_scaling_smoke" / "results.json").read_text())
    assert results["rows"][:3] == first["rows"] and [r["config"] for r in results["rows"][3:]] == \
        ["sdpa_flash"] * 3 + ["sdpa_cudnn"] * 3
    assert list(results["taken"]) == ["naive"]
    report = (tmp_path / "reports" / "e1_scaling_smoke" / "report.md").read_text()
    assert "Taken as they were from an earlier invocation (`--resume`), not measured again: `naive` (" in report
    (runs_dir / "sdpa_flash" / experiment.RUN_RECORD).write_text('{"config": "sdpa_flash", "ro')   # cut short
    swept.clear()
    assert experiment.main([*args, "--resume", str(runs_dir)]) == 0
    assert swept == [["sdpa_flash"]] and "sdpa_flash: run.json is unusable" in capsys.readouterr().out


@pytest.mark.slow
def test_e2_passkey_smoke(tmp_path, cache_dir):
    report_dir, results = run_smoke("e2_passkey", tmp_path, cache_dir)
    contexts = [run["seq_len"] for run in results["runs"]]
    assert contexts == [128, 256, 512] and [run["seed"] for run in results["runs"]] == [0, 0, 0]
    assert len({run["tokens"] for run in results["runs"]}) == 1   # the same token budget at every context
    for seq_len in contexts:
        grid = results["accuracy"][str(seq_len)]["0"]              # seed 0: rows depths, columns lengths
        assert len(grid) == len(results["depths"]) and all(len(row) == len(results["lengths"]) for row in grid)
        assert all(0 <= acc <= 1 for row in grid for acc in row)
        tokens = results["token_accuracy"][str(seq_len)]["0"]     # per length, mean over depths
        assert len(tokens) == len(results["lengths"]) and all(0 <= acc <= 1 for acc in tokens)
        assert (report_dir / f"passkey_ctx{seq_len}.png").exists()
    assert "Answer tokens right" in (report_dir / "report.md").read_text()


@pytest.mark.slow
def test_e3_context_smoke(tmp_path, cache_dir):
    """Two seeds per context at the same tokens per step; all six models scored on identical val tokens."""
    report_dir, results = run_smoke("e3_context", tmp_path, cache_dir)
    runs = results["runs"]
    assert [run["run"] for run in runs] == [f"ctx{c}_seed{s}" for c in (64, 128, 256) for s in (0, 1)] + \
        ["ctx64_span256_seed0", "ctx64_span256_seed1"]
    assert {run["seq_len"] * run["batch_size"] for run in runs} == {512}   # batch shrinks as context grows
    assert len({run["tokens"] for run in runs}) == 1
    assert "data.sample_span=256" in runs[-1]["overrides"] and "data.seq_len=64" in runs[-1]["overrides"]
    scores, controls = results["scores"], results["span_controls"]
    assert list(scores) == ["64", "128", "256"] and all(list(by_seed) == ["0", "1"] for by_seed in scores.values())
    assert scores["64"]["0"]["loss"] != scores["64"]["1"]["loss"]          # the seeds trained different models
    assert controls["span"] == 256 and list(controls["scores"]) == ["64"]
    assert controls["scores"]["64"]["0"]["loss"] != scores["64"]["0"]["loss"]   # other batches, another model
    check_identical_tokens(results, [s for by_seed in [*scores.values(), *controls["scores"].values()]
                                     for s in by_seed.values()])
    assert results["eval"]["length"] == 256 and results["eval"]["tokens"] == 2048   # runner.eval_tokens
    report = (report_dir / "report.md").read_text()
    assert "all 8 evaluations scored these same tokens" in report and " ± " in report   # mean ± sd over seeds
    assert "| 64, rows of 256 spans |" in report and "ctx 64 (256 spans)" in report
    mean = {name: sum(s["loss"] for s in by_seed.values()) / 2 for name, by_seed in
            [*scores.items(), ("control", controls["scores"]["64"])]}
    assert (f"- 64: the 256 model's loss minus the plain 64 model's: {mean['256'] - mean['64']:+.3f} nats/token; the "
            f"control's minus the plain model's: {mean['control'] - mean['64']:+.3f}") in report   # the gap, split
    assert (report_dir / "loss_by_position.png").exists()


class Killed(BaseException):
    """What a kill looks like to the experiment: no Exception handler of its own catches it."""


@pytest.mark.slow
def test_resume_reuses_finished_runs(tmp_path, cache_dir, monkeypatch, capsys):
    """An invocation killed in its third run, continued with --resume: the two finished runs are taken from
    their records and checkpoints (not trained again), the third resumes from its checkpoint
    (train.resume=latest), the runs it never started start as plain ones, and the report is the one of a run
    without the interruption, but for the wall-clocks."""
    real, calls, killed = experiment.train, [], []

    def dies_in_run_3(cfg):
        calls.append(cfg)
        if len(calls) == 3 and not killed:
            killed.append(cfg)
            part = copy.deepcopy(cfg)
            part.train.max_steps = cfg.train.max_steps // 2   # half its steps trained and checkpointed, then killed
            real(part)
            raise Killed   # a kill: nothing of the experiment's own handling runs
        return real(cfg)
    monkeypatch.setattr(experiment, "train", dies_in_run_3)
    args = ["e3_context", "--smoke", "--reports", str(tmp_path / "reports"), "--outputs", str(tmp_path / "outputs"),
            f"cache_dir={cache_dir}"]
    with pytest.raises(Killed):
        experiment.main(args)
    [runs_dir] = (tmp_path / "outputs" / "e3_context_smoke").iterdir()
    first = [json.loads((runs_dir / label / experiment.RUN_RECORD).read_text()) for label in
             ("ctx64_seed0", "ctx64_seed1")]
    assert not (runs_dir / "ctx128_seed0" / experiment.RUN_RECORD).exists()
    assert all(set(run["score"]) >= {"loss", "digest"} for run in first)   # each record kept its evaluation
    first = [{k: v for k, v in run.items() if k not in ("score", "parameters")} for run in first]
    calls.clear()
    assert experiment.main([*args, "--resume", str(runs_dir)]) == 0
    assert len(calls) == 6   # runs 3-8 only: the third from its checkpoint, the others never started
    assert [cfg.train.resume for cfg in calls] == ["latest"] + [None] * 5
    assert "ctx64_seed0 finished before (--resume): not trained again" in capsys.readouterr().out
    results = json.loads((tmp_path / "reports" / "e3_context_smoke" / "results.json").read_text())
    assert results["runs"][:2] == first and [r["run"] for r in results["runs"]] == \
        [f"ctx{c}_seed{s}" for c in (64, 128, 256) for s in (0, 1)] + ["ctx64_span256_seed0", "ctx64_span256_seed1"]
    assert results["runs"][2]["resumed"] and results["runs"][2]["steps"] == calls[0].train.max_steps
    assert not any(r.get("resumed") for r in results["runs"][3:])
    # a damaged record is not trusted: that run goes through train.resume=latest (its final checkpoint), once
    (runs_dir / "ctx64_seed1" / experiment.RUN_RECORD).write_text('{"run": "ctx64_se')
    calls.clear()
    assert experiment.main([*args, "--resume", str(runs_dir)]) == 0
    assert [cfg.out_dir.rsplit("/", 1)[-1] for cfg in calls] == ["ctx64_seed1"]
    assert "ctx64_seed1: run.json or its checkpoint is unusable" in capsys.readouterr().out
    rerun = json.loads((runs_dir / "ctx64_seed1" / experiment.RUN_RECORD).read_text())
    assert rerun["resumed"] and rerun["steps"] == first[1]["steps"] and rerun["checkpoint"] == first[1]["checkpoint"]
    check_identical_tokens(results, [s for by_seed in results["scores"].values() for s in by_seed.values()])
    # records alone (checkpoints gone, as when a runs directory's records are carried to another machine): each
    # record kept its evaluation, so nothing is trained or scored again and the report's numbers are the same
    results = json.loads((tmp_path / "reports" / "e3_context_smoke" / "results.json").read_text())
    for checkpoint in runs_dir.rglob("*.pt"):
        checkpoint.unlink()
    calls.clear()
    assert experiment.main([*args, "--resume", str(runs_dir)]) == 0 and calls == []
    again = json.loads((tmp_path / "reports" / "e3_context_smoke" / "results.json").read_text())
    assert again["scores"] == results["scores"] and again["span_controls"] == results["span_controls"]
    assert again["runs"] == results["runs"] and all("score" not in run for run in again["runs"])
    assert again["parameters"] == results["parameters"]
    # a runs directory that does not exist: one line naming --resume
    assert experiment.main([*args, "--resume", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("config error: --resume: ")


@pytest.mark.slow
def test_extend_trains_only_the_added_runs(tmp_path, cache_dir, monkeypatch, capsys):
    """--extend: an E3 results.json without span controls, extended by the config that has them: only the two
    control runs train (the earlier six from their kept records, no checkpoint needed), the earlier scores stay
    as they were and the report says which runs were taken. A changed setting or E4: one line, nothing written."""
    real, calls = experiment.train, []
    monkeypatch.setattr(experiment, "train", lambda cfg: calls.append(cfg) or real(cfg))
    common = ["e3_context", "--smoke", "--reports", str(tmp_path / "reports"), "--outputs", str(tmp_path / "outputs"),
              f"cache_dir={cache_dir}"]
    assert experiment.main([*common, "runner.span_controls=[]"]) == 0 and len(calls) == 6
    results_file = tmp_path / "reports" / "e3_context_smoke" / "results.json"
    before = json.loads(results_file.read_text())
    for checkpoint in (tmp_path / "outputs").rglob("*.pt"):
        checkpoint.unlink()
    calls.clear()
    assert experiment.main([*common, "--extend", "train.lr=0.5"]) == 2     # not the config the runs had
    assert "config error: train.lr: " in capsys.readouterr().err and calls == []
    assert len(list((tmp_path / "outputs" / "e3_context_smoke").iterdir())) == 1   # no records written
    assert experiment.main([*common, "--extend"]) == 0
    assert [cfg.out_dir.rsplit("/", 1)[-1] for cfg in calls] == ["ctx64_span256_seed0", "ctx64_span256_seed1"]
    assert all(cfg.train.resume is None for cfg in calls)   # new runs: plain ones, not resumes
    after = json.loads(results_file.read_text())
    assert after["scores"] == before["scores"] and list(after["span_controls"]["scores"]) == ["64"]
    assert [r["run"] for r in after["runs"][:6]] == [r["run"] for r in before["runs"]]
    assert all(r["reused"]["commit"] == before["environment"]["commit"] for r in after["runs"][:6])
    check_identical_tokens(after, [s for by_seed in [*after["scores"].values(), *after["span_controls"]["scores"]
                                                     .values()] for s in by_seed.values()])
    assert not any(r.get("resumed") for r in after["runs"][6:])
    report = (tmp_path / "reports" / "e3_context_smoke" / "report.md").read_text()
    assert "not trained or scored again: ctx64_seed0, ctx64_seed1, ctx128_seed0" in report
    assert "train.resume" not in report   # the reproduce commands are the plain runs
    e4 = ["e4_extend", "--smoke", "--reports", str(tmp_path / "reports"), "--extend"]
    (tmp_path / "reports" / "e4_extend_smoke").mkdir()
    (tmp_path / "reports" / "e4_extend_smoke" / "results.json").write_text(json.dumps(
        {**before, "experiment": "e4_extend_smoke", "base": "e4_extend"}))
    assert experiment.main(e4) == 2 and "config error: --extend: " in capsys.readouterr().err


@pytest.mark.slow
def test_e4_extend_smoke(tmp_path, cache_dir):
    """Per seed: the short base, then each method's fine-tune from that seed's base; every row scored on the same
    tokens, the extended rows on passkey at each runner.passkey_lengths and the base at its own length."""
    report_dir, results = run_smoke("e4_extend", tmp_path, cache_dir)
    methods = ["none", "pi", "theta", "yarn"]
    assert [run["run"] for run in results["runs"]] == [
        label for seed in (0, 1) for label in (f"short128_seed{seed}", *[f"finetune_{m}_seed{seed}" for m in methods])]
    for seed in (0, 1):
        short, *tuned = [run for run in results["runs"] if run["seed"] == seed]
        assert short["run"] == f"short128_seed{seed}" and len(tuned) == 4
        assert len({(run["steps"], run["tokens"]) for run in tuned}) == 1   # the same fine-tune for every method
        for run in tuned:  # fine-tuned at the long context from this seed's short run's weights
            assert run["seq_len"] == 1024 and run["steps"] == 5
            assert f"train.init_from={short['checkpoint']}" in run["overrides"]
        config = [load_checkpoint(experiment.ROOT / run["checkpoint"])["model_config"] for run in tuned]
        plain = config[0]                                                   # the control: RoPE as trained
        assert (plain["rope_scaling_factor"], plain["rope_theta"], plain["rope_scaling"]) == (1.0, 10000.0, "linear")
        assert config[1]["rope_scaling_factor"] == 8.0
        assert config[2]["rope_theta"] == 100000.0
        assert (config[3]["rope_scaling"], config[3]["rope_scaling_factor"], config[3]["rope_original_seq_len"]) == (
            "yarn", 8.0, 128)
    variants = results["variants"]
    assert [(v["method"], v["finetune_steps"]) for v in variants] == [(None, 0)] + [
        (m, steps) for m in methods for steps in (0, 5)]
    assert [v["context"] for v in variants] == [128] + [1024] * 8
    assert all(list(v["by_seed"]) == ["0", "1"] for v in variants)   # as results.json keeps them (JSON keys)
    evaluations = [e for v in variants for e in v["by_seed"].values()]
    check_identical_tokens(results, evaluations)   # the 128-token windows too: every row, every seed, the same tokens
    base, *extended = variants
    assert [set(e["passkey"]) for e in base["by_seed"].values()] == [{"128"}] * 2
    assert all(set(e["passkey"]) == {"512", "1024"} for v in extended for e in v["by_seed"].values())
    for e in evaluations:
        assert all(0 <= acc <= 1 for acc in [*e["passkey"].values(), *e["by_depth"]])
    assert (report_dir / "extension.png").exists()
    report = (report_dir / "report.md").read_text()
    assert "| variant | windows | val loss | val ppl | passkey @128 | passkey @512 | passkey @1K |" in report
    assert "mean ± standard deviation over seeds 0, 1" in report
    # results written before seeds and passkey lengths (one evaluation a row, passkey at its window: the layout of
    # reports of 2026-12-04 and earlier) still make a report, so --report-only need not retrain them
    old = copy.deepcopy(results)
    for v in old["variants"]:
        e = v.pop("by_seed")["0"]
        v |= {k: e[k] for k in ("loss", "loss_by_bin", "tokens_by_bin", "tokens", "digest", "by_depth")}
        v["passkey_acc"] = e["passkey"][str(v["context"]) if v["method"] is None else "1024"]
    (tmp_path / "old").mkdir()
    experiment.write_report(old, tmp_path / "old")
    report = (tmp_path / "old" / "report.md").read_text()
    assert "| passkey @128 | passkey @1K |" in report and "over seeds" not in report


# --- errors ----------------------------------------------------------------------------------------------

def test_unknown_experiment_is_one_line(capsys):
    assert experiment.main(["e9_nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown experiment 'e9_nope'" in err[0] and "e2_passkey" in err[0]


@pytest.mark.parametrize("override, key", [
    ("train.lr=abc", "train.lr"),                       # validate(), before any data is built
    ("train.no_such_key=1", "train.no_such_key"),        # Hydra's own composition error
    ("runner.tokens_per_step=1000", "runner.tokens_per_step"),  # not a multiple of the contexts
    ("runner.seeds=[0,0]", "runner.seeds"),
    ("runner.eval_stride=2", "runner.eval_stride"),      # checked with the pieces, before the first run
    ("runner.eval_tokens=0", "runner.eval_tokens"),
    ("runner.eval_length=128", "runner.eval_length"),    # shorter than the longest context
    ("runner.span_controls=[96]", "runner.span_controls"),  # does not divide the longest context
    ("runner.span_controls=[256]", "runner.span_controls"),  # the longest context itself: no control
])
def test_config_error_is_one_line(tmp_path, cache_dir, capsys, override, key):
    code = experiment.main(["e3_context_smoke", "--reports", str(tmp_path), "--outputs", str(tmp_path / "out"),
                            f"cache_dir={cache_dir}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("config error: ") and key in err[-1]
    assert not (tmp_path / "out").exists()              # no run started


@pytest.mark.parametrize("lengths", ["[128]", "[2048]", "[512,512]"])   # not above the short context, past the long one
def test_e4_passkey_lengths_are_checked(tmp_path, cache_dir, capsys, lengths):
    code = experiment.main(["e4_extend_smoke", "--reports", str(tmp_path), "--outputs", str(tmp_path / "out"),
                            f"cache_dir={cache_dir}", f"runner.passkey_lengths={lengths}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("config error: runner.passkey_lengths: ")
    assert not (tmp_path / "out").exists()              # no run started


def test_report_only_needs_current_results(tmp_path, capsys):
    """--report-only with no results.json, or one this script did not write (an older layout): one line."""
    args = ["e3_context", "--report-only", "--reports", str(tmp_path)]
    assert experiment.main(args) == 2
    assert "no " in capsys.readouterr().err and not (tmp_path / "e3_context" / "report.md").exists()
    (tmp_path / "e3_context").mkdir()
    (tmp_path / "e3_context" / "results.json").write_text(json.dumps({"experiment": "e3_context", "runs": []}))
    assert experiment.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format None" in err[0] and not (tmp_path / "e3_context" / "report.md").exists()


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

    def run_point(name, model_name, seq_len, steps, device, compile=False, **kw):
        if name == "naive" and seq_len > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(name, model_name, seq_len, steps, device, compile, **kw)

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


def test_spread_keeps_trailing_zeros():
    # a loss of 4.500 printed as "4.5" in a column of 4.423 reads as a coarser measurement (E4's first 2-seed report)
    assert experiment.spread([4.49, 4.51]) == "4.500 ± 0.014"
    assert experiment.spread([5.0, 5.0]) == "5.000 ± 0.0"
    assert experiment.spread([0.5, 0.7], 2) == "0.60 ± 0.14"
    assert experiment.spread([4.5]) == 4.5 and experiment.spread([1.0, None]) is None
