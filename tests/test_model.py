"""model/: shapes, attention backends agreeing (with and without document masking), RoPE, GQA,
KV-cache generation, config validation, init. CPU, small shapes, seconds."""
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from model import GPT, GPTConfig, KVCache, attention
from model.rope import RotaryEmbedding, apply_rope

ROOT = Path(__file__).resolve().parents[1]
# The kernels package is written alongside this one; its backends are tested as soon as it exists.
KERNELS = (ROOT / "kernels" / "__init__.py").exists()
# These tests use CPU tensors, where "flash" means Triton's interpreter (conftest turns it on without CUDA).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [
    pytest.param("reference", marks=pytest.mark.skipif(not KERNELS, reason="kernels/ not written yet")),
    pytest.param("flash", marks=pytest.mark.skipif(not (KERNELS and INTERPRET),
                                                   reason="needs kernels/ and TRITON_INTERPRET=1 on CPU")),
    "sdpa",
    "naive",
]
VOCAB = 128


def make_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=VOCAB, seq_len=64, n_layer=2, n_head=4, d_model=64, attention="naive", sdpa_backend="math")
    kw.update(overrides)
    return GPTConfig(**kw)


def make_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(make_config(**overrides)).eval()


def with_backend(model: GPT, backend: str) -> GPT:
    """The same weights under another attention backend."""
    for block in model.blocks:
        block.attn.backend = backend
    return model


def packed_batch(seed=1, B=2, T=32, doc_lens=(10, 22, 18, 14)):
    """B rows of T tokens holding documents of doc_lens (flattened), positions restarting per document."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=g)
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    cu_seqlens = torch.tensor([0, *torch.tensor(doc_lens).cumsum(0).tolist()], dtype=torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in doc_lens]).view(B, T)
    return input_ids, targets, position_ids, cu_seqlens


# --- shapes, init, parameters ---------------------------------------------------------------------

def test_shapes_and_ignore_index():
    model = make_model()
    input_ids, targets, _, _ = packed_batch()
    logits, loss = model(input_ids)
    assert logits.shape == (2, 32, VOCAB) and loss is None
    masked = targets.clone()
    masked[:, :8] = -100
    logits, loss = model(input_ids, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, VOCAB), targets[:, 8:].reshape(-1))
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_loss_at_init_is_log_vocab():
    model = make_model(vocab_size=512)
    input_ids = torch.randint(0, 512, (4, 64))
    targets = torch.randint(0, 512, (4, 64))
    _, loss = model(input_ids, targets)
    assert abs(loss.item() - math.log(512)) < 0.05


def test_tied_embeddings_share_storage():
    tied, untied = make_model(), make_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    table = VOCAB * 64
    # a tied table is counted once, as lm_head's weight; untied, the lookup-only table is left out
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + table
    assert untied.num_params() == tied.num_params()


def test_residual_projections_have_scaled_init():
    model = make_model(n_layer=8, d_model=128, seq_len=16)
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / 4) < 0.0005   # 1/sqrt(2*8)


def test_param_count_flops_and_presets():
    for name, expected in (("tiny", None), ("gpt2_small", 124.3e6), ("gpt2_medium", 354.6e6), ("llama_1b", 1.18e9)):
        d = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
        assert d["vocab_size"] is None and d["seq_len"] is None   # the trainer fills both
        d.update(vocab_size=50257, seq_len=1024)
        with torch.device("meta"):
            model = GPT(GPTConfig(**d))
        if expected is not None:
            assert abs(model.num_params(non_embedding=False) - expected) / expected < 0.01, name
    c = model.config
    assert model.flops_per_token(4096) == 6 * model.num_params() + 6 * c.n_layer * c.d_model * 4096


def test_configure_optimizer_decays_only_matrices():
    model = make_model(bias=True, tie_embeddings=True)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --- architecture variants ------------------------------------------------------------------------

def test_gqa_projection_shapes():
    model = make_model(n_head=8, n_kv_head=2, d_model=128)     # head_dim 16: q 8 heads, k and v 2 each
    assert model.blocks[0].attn.qkv.weight.shape == ((8 + 2 * 2) * 16, 128)
    input_ids, targets, _, _ = packed_batch()
    logits, loss = model(input_ids, targets)
    assert logits.shape == (2, 32, VOCAB) and torch.isfinite(loss)


def test_swiglu_rmsnorm():
    model = make_model(mlp="swiglu", norm="rmsnorm")
    assert model.config.d_ff == 192                              # 8/3 * 64 rounded up to 64
    assert model.blocks[0].mlp.fc.weight.shape == (2 * 192, 64)
    assert isinstance(model.norm_f, torch.nn.RMSNorm)
    input_ids, targets, _, _ = packed_batch()
    _, loss = model(input_ids, targets)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].mlp.fc.weight.grad is not None


def test_learned_vs_rope_positions():
    learned, rope = make_model(pos="learned", seq_len=32), make_model(pos="rope", seq_len=32)
    assert learned.pos_emb.weight.shape == (32, 64) and learned.rope is None
    assert rope.pos_emb is None and rope.rope is not None
    long = torch.randint(0, VOCAB, (1, 48))
    with pytest.raises(ValueError, match="seq_len"):
        learned(long)
    assert rope(long)[0].shape == (1, 48, VOCAB)                 # RoPE runs past the training context


def test_rope_table_is_built_outside_compiled_graphs():
    # the cos/sin table is module state: built inside a compiled graph it would be one of the graph's outputs,
    # whose memory CUDA graphs (train.compile_mode=reduce-overhead) reuse on the next replay
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = make_model(pos="rope", seq_len=32)
    compiled = torch.compile(model, backend=record)
    compiled(torch.randint(0, VOCAB, (1, 16)))
    targets = {node.target for gm in graphs for node in gm.graph.nodes}
    assert graphs and model.rope.cos is not None and torch.outer not in targets


def test_rope_relative_and_scaling():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    rope = RotaryEmbedding(32, max_positions=8)
    cos, sin = rope(torch.arange(48)[None])                      # T=48 > max_positions: the table grows
    assert rope.cos.shape == (48, 32) and cos.dtype == torch.float32

    def score(pq, pk):
        return (apply_rope(q, cos[:, pq:pq + 1], sin[:, pq:pq + 1]) * apply_rope(k, cos[:, pk:pk + 1], sin[:, pk:pk + 1])).sum()

    torch.testing.assert_close(score(3, 1), score(40, 38))        # only the distance matters
    positions = torch.arange(0, 40, 2)[None]
    scaled = RotaryEmbedding(32, max_positions=40, scaling_factor=2.0)(positions)
    plain = RotaryEmbedding(32, max_positions=40)(positions // 2)
    torch.testing.assert_close(scaled, plain)                    # linear interpolation: p -> p / 2


def test_rope_prefix_is_the_table_not_a_copy():
    rope = RotaryEmbedding(32, max_positions=16)
    positions = torch.arange(40).expand(3, 40)
    views, gathered = rope.prefix(3, 40, torch.device("cpu")), rope(positions)
    for view, copy, table in zip(views, gathered, (rope.cos, rope.sin)):
        torch.testing.assert_close(view, copy, rtol=0, atol=0)
        assert view.shape == (3, 40, 32) and view.data_ptr() == table.data_ptr()   # no new storage


def test_rope_yarn():
    """YaRN keeps the frequencies that turn more than 32 times over the original context, divides those
    that turn less than once by the factor, ramps between; the tables carry the (0.1 ln s + 1) scale."""
    positions = torch.arange(300)[None]
    plain = RotaryEmbedding(64, max_positions=300)
    for a, b in zip(RotaryEmbedding(64, 300, scaling="yarn")(positions), plain(positions)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)         # factor 1: unchanged
    yarn = RotaryEmbedding(64, 300, scaling_factor=4.0, scaling="yarn", original_max_positions=256)
    ratio = yarn.inv_freq() / plain.inv_freq()
    turns = 256 * plain.inv_freq() / (2 * math.pi)
    assert torch.all(ratio[turns >= 32] == 1.0) and torch.allclose(ratio[turns <= 1], torch.tensor(0.25, dtype=ratio.dtype))
    between = ratio[(turns > 1) & (turns < 32)]
    assert between.numel() > 0 and torch.all((between > 0.25) & (between < 1.0))
    assert torch.all(ratio[1:] <= ratio[:-1])                    # slower frequencies, more interpolation
    cos, sin = yarn(positions)
    scale = 0.1 * math.log(4.0) + 1
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, scale ** 2))
    angles = torch.outer(torch.arange(300, dtype=torch.float64), yarn.inv_freq())
    torch.testing.assert_close(cos[0, :, :32], (angles.cos() * scale).float())
    # the model uses it; a factor without the original context is an error naming the field
    model = GPT(make_config(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_seq_len=16))
    assert model.rope.scaling == "yarn" and model.rope.attention_scale == scale


# --- attention backends ---------------------------------------------------------------------------

@pytest.mark.parametrize("doc_lens", [(10, 22, 18, 14), (10, 30, 24)], ids=["row_aligned", "doc_across_rows"])
@pytest.mark.parametrize("arch", [dict(), dict(n_kv_head=2, window=5)], ids=["mha", "gqa_window"])
def test_backends_agree(arch, doc_lens):
    model = make_model(**arch)
    input_ids, targets, position_ids, cu_seqlens = packed_batch(doc_lens=doc_lens)
    ref_plain = model(input_ids, targets)
    ref_docs = model(input_ids, targets, position_ids, cu_seqlens)
    # documents must change the answer, or this test would not see a backend ignoring them
    assert (ref_plain[1] - ref_docs[1]).abs() > 1e-3
    for backend in ["sdpa"] + (["reference"] if KERNELS else []):
        with_backend(model, backend)
        for (logits, loss), args in ((ref_plain, ()), (ref_docs, (position_ids, cu_seqlens))):
            got_logits, got_loss = model(input_ids, targets, *args)
            torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=1e-4, msg=backend)
            torch.testing.assert_close(got_loss, loss, atol=1e-5, rtol=1e-5, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_boundaries_change_nothing(backend):
    # cu_seqlens padded with empty trailing segments (data/loader.py's bucket_boundaries, for CUDA graphs):
    # the same logits, loss and gradients as the exact boundaries
    from data.loader import pad_boundaries
    model = with_backend(make_model(n_kv_head=2), backend)
    input_ids, targets, position_ids, cu_seqlens = packed_batch(doc_lens=(10, 22, 18, 14))
    padded = pad_boundaries(cu_seqlens)
    assert padded.numel() == 8 and padded[5:].tolist() == [64] * 3
    results = []
    for cu in (cu_seqlens, padded):
        model.zero_grad()
        logits, loss = model(input_ids, targets, position_ids, cu)
        loss.backward()
        results.append((logits, loss, [p.grad.clone() for p in model.parameters()]))
    (logits, loss, grads), (logits2, loss2, grads2) = results
    torch.testing.assert_close(logits2, logits, atol=0, rtol=0)
    torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_document_masking_isolates_documents(backend):
    model = with_backend(make_model(n_kv_head=2), backend)
    input_ids, _, position_ids, cu_seqlens = packed_batch(B=1, T=32, doc_lens=(10, 22))
    logits = model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens)[0]
    # doc 2 packed after doc 1 == doc 2 alone: no leak across the boundary, positions restart
    alone = model(input_ids[:, 10:])[0]
    torch.testing.assert_close(logits[:, 10:], alone, atol=1e-4, rtol=1e-4)
    # changing doc 1 changes doc 1 only
    edited = input_ids.clone()
    edited[:, :10] = (edited[:, :10] + 1) % VOCAB
    logits2 = model(edited, position_ids=position_ids, cu_seqlens=cu_seqlens)[0]
    torch.testing.assert_close(logits2[:, 10:], logits[:, 10:])
    assert (logits2[:, :10] - logits[:, :10]).abs().max() > 1e-3
    # doc_masking=False ignores cu_seqlens: doc 2 sees doc 1 again
    model.config.doc_masking = False
    unmasked = model(edited, position_ids=position_ids, cu_seqlens=cu_seqlens)[0]
    assert (unmasked[:, 10:] - logits[:, 10:]).abs().max() > 1e-3


@pytest.mark.skipif(not KERNELS, reason="kernels/ not written yet")
def test_reference_gradients_match_naive():
    input_ids, targets, position_ids, cu_seqlens = packed_batch()
    grads = {}
    for backend in ("naive", "reference"):
        model = with_backend(make_model(n_kv_head=2), backend)
        model(input_ids, targets, position_ids, cu_seqlens)[1].backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["naive"].items():
        torch.testing.assert_close(grads["reference"][name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_bf16_autocast_close_to_fp32(backend):
    model = with_backend(make_model(), backend)
    input_ids, targets, position_ids, cu_seqlens = packed_batch()
    _, loss32 = model(input_ids, targets, position_ids, cu_seqlens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(input_ids, targets, position_ids, cu_seqlens)
    assert loss16.dtype == torch.float32 and abs(loss16.item() - loss32.item()) < 0.02


def test_attention_rejects_unknown_backend_and_flash_on_cpu(monkeypatch):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, "fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        attention(q, q, q, "flash")


# --- generation -----------------------------------------------------------------------------------

GEN_ARCHS = {
    "rope": dict(),
    "learned": dict(pos="learned"),
    "gqa_swiglu_rmsnorm": dict(n_kv_head=2, mlp="swiglu", norm="rmsnorm"),
    "window": dict(window=4),
    "sdpa": dict(attention="sdpa"),
}


@pytest.mark.parametrize("arch", GEN_ARCHS.values(), ids=GEN_ARCHS.keys())
def test_kv_cache_matches_full_forward(arch):
    model = make_model(**arch)
    input_ids = torch.randint(0, VOCAB, (2, 20))
    full = model(input_ids)[0]
    caches = [KVCache() for _ in model.blocks]
    steps = [model._logits(input_ids[:, :7], caches=caches)]           # prefill 7, then one at a time
    for t in range(7, 20):
        steps.append(model._logits(input_ids[:, t:t + 1], torch.full((2, 1), t), caches=caches))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", GEN_ARCHS.values(), ids=GEN_ARCHS.keys())
def test_generate_greedy_cache_equals_no_cache(arch):
    model = make_model(seq_len=16, **arch)
    prompt = torch.randint(0, VOCAB, (2, 5))
    # 20 new tokens run the context past seq_len=16, where the window starts to slide
    cached = model.generate(prompt, 20, temperature=0.0, use_cache=True)
    plain = model.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 25) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain)


def test_generate_sampling_top_k():
    model = make_model()
    torch.manual_seed(0)
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 10, temperature=1.0, top_k=1)
    greedy = model.generate(torch.zeros(1, 1, dtype=torch.long), 10, temperature=0.0)
    assert torch.equal(out, greedy)                                  # top_k=1 leaves only the argmax


# --- config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=66), "d_model"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(d_model=48), "n_head"),                                    # head_dim 12, not a multiple of 8
    (dict(mlp="relu"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(pos="alibi"), "pos"),
    (dict(attention="flashy"), "attention"),
    (dict(sdpa_backend="fast"), "sdpa_backend"),
    (dict(vocab_size=None), "vocab_size"),
    (dict(seq_len=None), "seq_len"),
    (dict(window=-2), "window"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(pos="learned", rope_scaling_factor=2.0), "rope_scaling_factor"),
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(rope_scaling="yarn", rope_scaling_factor=4.0), "rope_original_seq_len"),
    (dict(rope_scaling="yarn", rope_scaling_factor=0.5, rope_original_seq_len=64), "rope_scaling_factor"),
    (dict(attention="sdpa", sdpa_backend="flash"), "sdpa_backend"),  # flash SDPA takes no document mask
    (dict(deterministic_attention="yes"), "deterministic_attention"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}\b"):
        make_config(**overrides)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_attention_reaches_the_kernels(deterministic, monkeypatch):
    # model.deterministic_attention is flash_attn_func's / flash_attn_varlen_func's deterministic, with and
    # without documents
    import kernels
    seen = []

    def spy(real):
        def fn(*args, **kwargs):
            seen.append(kwargs["deterministic"])
            return real(*args, **kwargs)
        return fn
    monkeypatch.setattr(kernels, "flash_attn_func", spy(kernels.flash_attn_func))
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", spy(kernels.flash_attn_varlen_func))
    model = make_model(attention="reference", deterministic_attention=deterministic)
    input_ids = torch.randint(0, VOCAB, (2, 12))
    model(input_ids)
    model(input_ids, cu_seqlens=torch.tensor([0, 5, 24], dtype=torch.int32))
    assert seen == [deterministic] * 4   # two layers, two calls


def test_config_defaults():
    c = make_config(n_head=4, n_kv_head=None)
    assert c.n_kv_head == 4 and c.d_ff == 256 and c.head_dim == 16
    assert make_config(attention="sdpa", sdpa_backend="flash", doc_masking=False).sdpa_backend == "flash"


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and KERNELS), reason="needs CUDA and kernels/")
def test_flash_matches_sdpa_on_cuda_bf16():
    model = make_model(n_kv_head=2, attention="flash", sdpa_backend="efficient").cuda()
    input_ids, targets, position_ids, cu_seqlens = (t.cuda() for t in packed_batch())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, flash = model(input_ids, targets, position_ids, cu_seqlens)
        _, sdpa = with_backend(model, "sdpa")(input_ids, targets, position_ids, cu_seqlens)
    assert abs(flash.item() - sdpa.item()) < 1e-2


@pytest.mark.parametrize("plan", ["none", "selective"])
def test_documents_cost_one_read_back_a_step(plan, monkeypatch, device):
    """The kernels check a varlen call's offsets by reading them back to the host, a device sync. The model
    hands every layer, forward and backward, one merged offsets tensor, so a training step with documents
    reads back once, not once per layer (issue 23: 2 x n_layer syncs a step before)."""
    import kernels.validate as validate
    from training.memory import apply_memory_plan
    reads, real = [], validate.read_back
    monkeypatch.setattr(validate, "read_back", lambda *a: reads.append(1) or real(*a))
    model = apply_memory_plan(make_model(n_layer=3, attention="flash", d_model=32, n_head=2).train(), plan, 0, 0)
    model.to(device)
    input_ids, targets, position_ids, cu_seqlens = (t.to(device) for t in packed_batch())
    for step in range(2):   # a new batch's offsets (a new tensor) are checked again, once
        reads.clear()
        _, loss = model(input_ids, targets, position_ids, cu_seqlens.clone())
        loss.backward()
        assert len(reads) == 1, (plan, step, len(reads))
