"""scripts/profile_step.py on CPU: a step's time split by kernel category, its arguments checked first."""
import json

import pytest

from scripts import profile_step


@pytest.mark.parametrize("name, cat", [
    ("_attn_fwd_hopper", "attention"), ("_attn_bwd_hopper", "attention"), ("_attn_bwd_preprocess", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("triton_tem_fused_flex_attention_0", "attention"), ("_rope_qkv_kernel", "rope"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN", "matmul"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"),
    ("aten::addmm", "matmul"), ("multi_tensor_apply_kernel", "optimizer"),
    ("triton_red_fused__log_softmax_backward_data_3", "loss"), ("triton_per_fused_native_layer_norm_7", "norm"),
    ("Memcpy DtoH (Device -> Pinned)", "copies"), ("triton_poi_fused_add_gelu_12", "other"),
])
def test_kernel_names_fall_in_their_category(name, cat):
    assert profile_step.category(name) == cat


def test_profile_splits_the_step(tmp_path, capsys):
    out = tmp_path / "p"
    assert profile_step.main(["--model", "tiny", "--configs", "sdpa_flash", "flash+docs", "--seq-len", "64",
                              "--batch", "2", "--device", "cpu", "--no-compile", "--warmup", "1", "--steps", "2",
                              "--profile-steps", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "profile.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["sdpa_flash", "flash+docs"]
    for r in rows:
        cats = r["categories"]
        assert sum(cats.values()) == pytest.approx(r["busy_ms"])
        assert r["step_ms"] == pytest.approx(r["busy_ms"] + r["gap_ms"])
        assert r["tokens_per_s"] == pytest.approx(2 * 64 / (r["step_ms"] / 1e3))
        for kind in ("matmul", "optimizer", "loss", "norm"):   # every step has them
            assert cats[kind] > 0, (r["config"], kind)
    assert rows[0]["categories"]["attention"] > 0   # SDPA's CPU kernel, by name
    assert "| sdpa_flash |" in capsys.readouterr().out


@pytest.mark.parametrize("args, key", [(["--configs", "bogus"], "unknown configuration 'bogus'"),
                                       (["--batch", "0"], "--batch 0"), (["--compile", "fast"], "--compile 'fast'"),
                                       (["--model", "huge"], "--model 'huge'")])
def test_bad_arguments_are_one_line(args, key, tmp_path, capsys):
    assert profile_step.main([*args, "--device", "cpu", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert key in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()   # nothing written before the arguments are checked


def test_passes_run_under_the_configurations_context(tmp_path, monkeypatch):
    # flash_triton's passes keep off the Gluon kernels in bench_context's sweep; the profile runs them the same way
    import contextlib
    from kernels.launch import override_gluon
    from scripts import bench_context
    assert bench_context.pass_context("flash_triton") is override_gluon
    entered = []
    monkeypatch.setattr(bench_context, "pass_context",
                        lambda name: lambda: entered.append(name) or contextlib.nullcontext())
    assert profile_step.main(["--model", "tiny", "--configs", "sdpa_flash", "--seq-len", "32", "--device", "cpu",
                              "--no-compile", "--warmup", "1", "--steps", "1", "--profile-steps", "1",
                              "--out", str(tmp_path / "p")]) == 0
    assert entered and set(entered) == {"sdpa_flash"} and len(entered) == 2 * 3   # forward and backward, 3 steps
