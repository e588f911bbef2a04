"""scripts/export_hf.py: a checkpoint in this project's format becomes a Hugging Face directory that
transformers loads without custom code and that computes our logits and our greedy tokens, for every
architecture family, RoPE setting and tokenizer; what cannot be exported exactly is refused in one
line. Tiny models trained a few steps (biases and norm gains away from their init), CPU, seconds."""
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from data.tokenizer import EOT, train_tokenizer
from model import GPT, GPTConfig
from model.rope import RotaryEmbedding
from training.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("export_hf", ROOT / "scripts" / "export_hf.py")
export_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_hf)

SEQ_LEN = 64
# RoPE scaling by 4 at seq_len 64: the context before extension is 16, and the inputs (48 tokens) go past it.
FACTOR, ORIGINAL = 4.0, 16
T = 48
# Our forward and transformers' run the same float32 ops in other orders: measured <= 5e-7 of the
# largest logit. Every wrong mapping tried (q/k or gate/up swapped, a bias or the RoPE scaling lost,
# exact GELU for the tanh one) was off by more than this bound.
RTOL = 1e-5
FAMILIES = {   # id: (GPTConfig overrides, the class transformers builds)
    "llama-gqa-untied": (dict(mlp="swiglu", norm="rmsnorm", n_kv_head=2, tie_embeddings=False), "LlamaForCausalLM"),
    "llama-bias-tied": (dict(mlp="swiglu", norm="rmsnorm", bias=True), "LlamaForCausalLM"),
    "neox-tied": (dict(), "GPTNeoXForCausalLM"),
    "neox-bias-untied": (dict(bias=True, tie_embeddings=False), "GPTNeoXForCausalLM"),
    "starcoder2-gqa-bias": (dict(n_kv_head=2, bias=True), "Starcoder2ForCausalLM"),
    "starcoder2-mqa-untied": (dict(n_kv_head=1, tie_embeddings=False), "Starcoder2ForCausalLM"),
    "gpt2-bias-tied": (dict(pos="learned", bias=True), "GPT2LMHeadModel"),
    "gpt2-gqa-untied": (dict(pos="learned", n_kv_head=2, tie_embeddings=False), "GPT2LMHeadModel"),
}
# Text for the tokenizer and the round trip: code, prose, odd whitespace, non-ASCII, spaces before punctuation.
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "Hello, world . It 's a test , isn't it ?",
    "  leading spaces,\ttabs\n\n\nand blank lines  ",
    "ünïcödé — 数学 🙂 ok",
    f"one document{EOT}the next",
]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [(ROOT / "model" / name).read_text() for name in ("gpt.py", "attention.py", "rope.py")] + TEXTS
    return train_tokenizer(iter(corpus), vocab_size=400)


def trained_checkpoint(tmp_path: Path, tokenizer, **overrides) -> tuple[Path, GPT]:
    """A GPT of `overrides` after 3 AdamW steps, saved as train.py saves it -> (latest.pt, the model in eval)."""
    kw = dict(vocab_size=tokenizer.get_vocab_size(), seq_len=SEQ_LEN, n_layer=2, n_head=4, d_model=64,
              attention="naive")
    config = GPTConfig(**{**kw, **overrides})
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        ids, targets = torch.randint(0, config.vocab_size, (2, 2, 32))
        model(ids, targets)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_checkpoint({
        "step": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": {},
        "loader": {}, "rng": {}, "model_config": dataclasses.asdict(config), "config": "",
        "tokenizer": tokenizer.to_str(),
    }, tmp_path / "checkpoints", step=3, keep=1)
    return path, model.eval()


def export(ckpt: Path, out: Path, *args: str) -> transformers.PreTrainedModel:
    assert export_hf.main([str(ckpt), str(out), *args]) == 0
    # the plain Auto class: no custom code is involved, or this would need trust_remote_code
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def assert_same_logits(ours: GPT, theirs, T: int = T) -> float:
    ids = torch.randint(0, ours.config.vocab_size, (2, T))
    with torch.no_grad():
        expected, got = ours(ids)[0], theirs(ids).logits
    err = (got - expected).abs().max().item()
    assert err <= RTOL * expected.abs().max().item(), f"max |logit diff| {err:.3g}"
    return err


def refused(capsys, ckpt: Path, out: Path) -> str:
    """The one stderr line of an export that must fail with rc 2, having written nothing."""
    assert export_hf.main([str(ckpt), str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_hf.py: ")
    assert not out.exists() or not any(out.iterdir())
    return lines[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match(tmp_path, tokenizer, family):
    """Each family's mapping: q/k/v and gate/up splits, NeoX's per-head qkv, GPT-2's transposed Conv1D and
    repeated kv heads, biases (and the zeros written for those we lack), norms, tied or untied lm_head."""
    overrides, cls = FAMILIES[family]
    ckpt, ours = trained_checkpoint(tmp_path, tokenizer, **overrides)
    theirs = export(ckpt, tmp_path / "hf")
    assert type(theirs).__name__ == cls
    tied = theirs.get_output_embeddings().weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()
    assert tied == ours.config.tie_embeddings
    assert_same_logits(ours, theirs)

    prompt = torch.randint(0, ours.config.vocab_size, (2, 8))
    expected = ours.generate(prompt, max_new_tokens=12, temperature=0)
    # eos_token_id=None: ours does not stop at the end-of-document token, so neither may theirs here
    got = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          eos_token_id=None)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("overrides", [
    pytest.param(dict(rope_theta=500.0), id="theta-llama"),
    pytest.param(dict(rope_theta=500.0, mlp="gelu", norm="layernorm"), id="theta-neox"),
    pytest.param(dict(rope_scaling_factor=FACTOR), id="linear-llama"),
    pytest.param(dict(rope_scaling_factor=FACTOR, mlp="gelu", norm="layernorm", n_kv_head=2), id="linear-starcoder2"),
])
def test_rope_settings_match(tmp_path, tokenizer, overrides):
    """theta and linear position interpolation reach transformers' rope_parameters, past the unscaled context."""
    ckpt, ours = trained_checkpoint(tmp_path, tokenizer, **{"mlp": "swiglu", "norm": "rmsnorm", **overrides})
    assert_same_logits(ours, export(ckpt, tmp_path / "hf"))


YARN = dict(mlp="swiglu", norm="rmsnorm", rope_scaling="yarn", rope_scaling_factor=FACTOR,
            rope_original_seq_len=ORIGINAL)


def test_yarn_maps_exactly(tmp_path, tokenizer):
    """YaRN (factor, original context, attention factor) reaches transformers' rope_parameters, and its
    frequencies are model/rope.py's: the logits match past the original context."""
    settings = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=SEQ_LEN,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": FACTOR,
                         "original_max_position_embeddings": ORIGINAL})
    hf_freq, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](settings)
    ours = RotaryEmbedding(16, SEQ_LEN, 10000.0, FACTOR, "yarn", ORIGINAL)
    torch.testing.assert_close(ours.inv_freq().float(), hf_freq.float(), rtol=1e-6, atol=0)
    assert ours.attention_scale == pytest.approx(hf_scale)
    ckpt, model = trained_checkpoint(tmp_path, tokenizer, **YARN)
    assert model.rope.attention_scale > 1.0                  # the scaled logits are part of what is compared
    assert_same_logits(model, export(ckpt, tmp_path / "hf"))


def test_tokenizer_round_trips_and_special_tokens(tmp_path, tokenizer):
    ckpt, _ = trained_checkpoint(tmp_path, tokenizer)
    model = export(ckpt, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == text                        # special tokens kept: the text itself
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
    eot = tokenizer.token_to_id(EOT)
    assert hf.eos_token == hf.bos_token == hf.pad_token == EOT and hf.eos_token_id == eot
    assert model.config.eos_token_id == model.generation_config.eos_token_id == eot
    assert hf.model_max_length == SEQ_LEN
    # transformers 4.x defaults to True, which deletes the space in " ," when decoding
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False


def test_dtype_bf16(tmp_path, tokenizer):
    """--dtype bf16 writes bf16 tensors: loaded in fp32 they are our weights rounded to bf16, exactly."""
    ckpt, ours = trained_checkpoint(tmp_path, tokenizer, mlp="swiglu", norm="rmsnorm", n_kv_head=2)
    theirs = export(ckpt, tmp_path / "hf", "--dtype", "bf16")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.to(torch.bfloat16))
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("overrides, field", [
    pytest.param(dict(norm="rmsnorm"), "norm='rmsnorm', mlp='gelu', pos='rope'", id="rmsnorm-gelu"),
    pytest.param(dict(mlp="swiglu", pos="learned"), "mlp='swiglu', pos='learned'", id="swiglu-learned"),
    pytest.param(dict(window=8), "GPTConfig.window=8", id="sliding-window"),
])
def test_unsupported_model_refused(tmp_path, tokenizer, capsys, overrides, field):
    ckpt, _ = trained_checkpoint(tmp_path, tokenizer, **overrides)
    assert field in refused(capsys, ckpt, tmp_path / "hf")


def test_non_empty_out_needs_force(tmp_path, tokenizer, capsys):
    ckpt, ours = trained_checkpoint(tmp_path, tokenizer)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_hf.main([str(ckpt), str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert_same_logits(ours, export(ckpt, out, "--force"))
    assert (out / "notes.txt").read_text() == "mine"


def test_missing_checkpoint_refused(tmp_path, capsys):
    line = refused(capsys, tmp_path / "missing.pt", tmp_path / "hf")
    assert line.endswith("missing.pt: no such file")


def test_command_line_unset_ckpt(tmp_path):
    """The script as `make export` runs it with no checkpoint found: the Makefile quotes CKPT, so it arrives
    empty (not shifted into OUT's place), and the exit is 2 with one line and no traceback."""
    result = subprocess.run([sys.executable, "scripts/export_hf.py", "", str(tmp_path / "hf")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["export_hf.py: no checkpoint given (make export: CKPT=path; "
                                                  "by default the newest outputs/*/*/checkpoints/latest.pt)"]
    assert not (tmp_path / "hf").exists()
