"""scripts/bench_context.py's configurations, on CPU: the PyTorch best-practice baseline (sdpa_cudnn+bp) is
the settings it names, as the model and train.py resolve them; the document-masked baseline's FlexAttention
block mask is the model's dense document mask; every name is checked before a point runs; FlexAttention,
which has no CPU backward in torch 2.13, is skipped on a CPU with one line."""
import dataclasses
import functools
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import model.gpt
import training.memory
from model import GPT
from model.attention import _mask, attention
from scripts import bench_context as bench
from training.validate import gpt_config as train_gpt_config
from training.validate import validate

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")   # CUDA: only resolved against, nothing allocated


def test_best_practice_resolves_to_sdpa_cudnn_block_checkpointing_loss_chunk_16k():
    """On CUDA the row is SDPA cuDNN with every block checkpointed and the loss in 16K-token tiles: the model
    the sweep builds, not only its table entry."""
    assert bench.CONFIGS["sdpa_cudnn+bp"] == bench.Config("sdpa", "cudnn", ("block", 0, 16384), docs=False)
    cfg = bench.gpt_config("sdpa_cudnn+bp", "gpt2_small", 1 << 20, CUDA)
    assert (cfg.attention, cfg.sdpa_backend, cfg.doc_masking, cfg.seq_len) == ("sdpa", "cudnn", False, 1 << 20)
    assert (cfg.n_layer, cfg.d_model, cfg.vocab_size) == (12, 768, 50304)
    m = bench.build("sdpa_cudnn+bp", "tiny", 128, CUDA)   # built on the CPU; run_point moves it
    assert m.loss_chunk == 16384 and len(m.blocks) == 2
    for block in m.blocks:
        assert (block.attn.backend, block.attn.sdpa_backend) == ("sdpa", "cudnn")
        assert block.seq_chunk == 0                                      # no sequence tiling
        fwd = block.forward                                              # apply_memory_plan's wrapper
        assert isinstance(fwd, functools.partial) and fwd.func is training.memory._checkpointed
        assert fwd.args[1:] == ("block", block)                          # torch.utils.checkpoint of the block
        assert block.attn.attention_fn is type(block.attn).attention_fn  # the model's own SDPA path
    # on a CPU, which has no cuDNN SDPA, the same plan with SDPA's CPU flash kernel
    assert bench.backend("sdpa_cudnn+bp", CPU) == bench.Config("sdpa", "flash", ("block", 0, 16384))


def test_best_practice_runs_what_it_names(monkeypatch):
    """A step of the CPU-resolved row goes through torch.utils.checkpoint once per block and the tiled loss
    with 16K-token tiles (no logits returned), and computes the plain model's loss."""
    calls, chunks = [], []
    real_checkpoint, real_loss = training.memory.checkpoint, model.gpt.chunked_cross_entropy
    monkeypatch.setattr(training.memory, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    monkeypatch.setattr(model.gpt, "chunked_cross_entropy",
                        lambda h, w, t, chunk: chunks.append(chunk) or real_loss(h, w, t, chunk))
    torch.manual_seed(0)
    m = bench.build("sdpa_cudnn+bp", "tiny", 128, CPU)
    plain = GPT(bench.gpt_config("sdpa_flash", "tiny", 128, CPU))
    plain.load_state_dict(m.state_dict())
    x, y = torch.randint(0, 512, (2, 2, 128))
    logits, loss = m(x, targets=y)
    loss.backward()
    assert logits is None and chunks == [16384] and len(calls) == len(m.blocks)
    torch.testing.assert_close(loss, plain(x, targets=y)[1])


@pytest.mark.parametrize("name", [n for n in bench.CONFIGS if bench.train_overrides(n) is not None])
def test_configs_are_the_train_py_settings_they_name(tmp_path, monkeypatch, name):
    """Each configuration with a train.py equivalent (all but flex) composes, as those Hydra overrides, to a
    config train.py accepts on a GPU, whose model and memory plan are the ones the sweep builds there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # validate() as on a one-GPU machine: it only
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)      # asks these, nothing is allocated
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=[f"out_dir={tmp_path}", f"cache_dir={tmp_path}", "model=gpt2_small",
                                           "data.seq_len=4096", "train.device=cuda",   # as on the GPU the sweep is for
                                           *bench.train_overrides(name)])
    validate(cfg)
    ours = bench.gpt_config(name, "gpt2_small", 4096, CUDA)
    theirs = train_gpt_config(cfg, 50304)
    for field in ("attention", "sdpa_backend", "doc_masking", "deterministic_attention"):
        assert getattr(theirs, field) == getattr(ours, field), field
    t = cfg.train
    assert (t.activation_checkpointing, t.seq_chunk, t.loss_chunk) == bench.CONFIGS[name].plan


def packed_rows(B: int, T: int, seed: int) -> torch.Tensor:
    """cu_seqlens over B rows of T tokens packed with documents of random odd lengths (each row's last
    document cut to fit, so some are even); a boundary at every row start, as the loader's."""
    rng = random.Random(seed)
    bounds = [0]
    for row in range(B):
        end = (row + 1) * T
        while bounds[-1] < end:
            bounds.append(min(bounds[-1] + rng.randrange(1, 2 * T // 5, 2), end))
    return torch.tensor(bounds, dtype=torch.int32)


def token_mask(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, T, T) what FlexAttention computes from a BlockMask: every key of a full block, and the mask_mod's
    answer inside partial blocks; nothing in blocks the mask skips. And (B, H, T, T) the blocks it visits."""
    B, H, Q, KV = block_mask.shape
    bq, bk = block_mask.BLOCK_SIZE

    def blocks(num, idx):   # kv_num_blocks / kv_indices (B, H, q blocks[, n]) -> dense (B, H, q blocks, kv blocks)
        dense = torch.zeros(*idx.shape[:3], -(-KV // bk), dtype=torch.bool)
        cols = torch.arange(idx.shape[-1])
        for b, h, q in torch.cartesian_prod(*map(torch.arange, idx.shape[:3])).tolist():
            dense[b, h, q, idx[b, h, q][cols < num[b, h, q]].long()] = True
        return dense.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :Q, :KV]

    partial = blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    b, h, q, k = (torch.arange(n).view([-1 if i == d else 1 for i in range(4)]) for d, n in enumerate((B, H, Q, KV)))
    mod = block_mask.mask_mod(b, h, q, k).expand(B, H, Q, KV)
    assert not (partial & full).any()
    return full | (partial & mod), full | partial


@pytest.mark.parametrize("seed, B, T, window", [(0, 1, 300, -1), (1, 2, 300, -1), (2, 3, 257, -1), (3, 2, 300, 45)])
def test_flex_block_mask_is_the_dense_document_mask(seed, B, T, window):
    """The block mask FlexDocumentAttention builds (create_block_mask with the document mask_mod, 128-token
    blocks over lengths that are not multiples of 128) lets exactly the (query, key) pairs through that the
    model's dense mask for SDPA does (model.attention._mask from the same document ids), and skips blocks."""
    cu = packed_rows(B, T, seed)
    assert any(n % 2 for n in torch.diff(cu).tolist()) and len(cu) > 2 * B
    flex = bench.FlexDocumentAttention(compiled=False)
    bm = flex.block_mask(cu, B, T, window, CPU)
    dense = _mask(T, T, CPU, window, bench.document_ids(cu, B, T))            # (B, 1, T, T) boolean
    computed, visited = token_mask(bm)
    assert torch.equal(computed, dense)
    # and it visits exactly the 128 x 128 blocks with a pair to compute: no block of other documents
    n = -(-T // 128) * 128
    padded = torch.zeros(B, 1, n, n, dtype=torch.bool)
    padded[..., :T, :T] = dense
    needed = padded.view(B, 1, n // 128, 128, n // 128, 128).any(5).any(3)
    assert torch.equal(visited, needed.repeat_interleave(128, 2).repeat_interleave(128, 3)[..., :T, :T])
    # one mask per forward: the same boundaries tensor again is the same mask; a new batch's is a new one
    assert flex.block_mask(cu, B, T, window, CPU) is bm
    assert flex.block_mask(cu.clone(), B, T, window, CPU) is not bm


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")   # eager on purpose: CPU
def test_flex_attention_equals_sdpa_with_the_dense_mask():
    """Forward only (FlexAttention has no CPU backward): FlexDocumentAttention on packed rows, grouped-query
    heads, equals the model's SDPA path with its dense document mask; and installed in a model, every layer
    uses it, one block mask per forward, and the logits are the SDPA model's."""
    torch.manual_seed(0)
    B, T, H, Hk, D = 2, 200, 4, 2, 16
    cu = packed_rows(B, T, 5)
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hk, D), torch.randn(B, T, Hk, D)
    flex = bench.FlexDocumentAttention(compiled=False)
    torch.testing.assert_close(flex(q, k, v, cu_seqlens=cu),
                               attention(q, k, v, "sdpa", cu_seqlens=cu, sdpa_backend="math"), atol=2e-5, rtol=1e-4)

    m = bench.build("flex+docs", "tiny", T, CPU)
    installed = {id(b.attn.attention_fn) for b in m.blocks}
    assert len(installed) == 1 and isinstance(m.blocks[0].attn.attention_fn, bench.FlexDocumentAttention)
    assert m.config.doc_masking and bench.CONFIGS["flex+docs"].plan == bench.NO_PLAN
    ref = GPT(dataclasses.replace(m.config, attention="sdpa", sdpa_backend="math"))   # the dense-mask path
    ref.load_state_dict(m.state_dict())
    fa = m.blocks[0].attn.attention_fn
    made = []
    real = fa.create_block_mask
    fa.create_block_mask = lambda *a, **kw: made.append(1) or real(*a, **kw)
    x = torch.randint(0, 512, (B, T))
    with torch.no_grad():
        torch.testing.assert_close(m(x, cu_seqlens=cu)[0], ref(x, cu_seqlens=cu)[0], atol=1e-4, rtol=1e-4)
    assert made == [1]


def test_packed_documents():
    cu, pos, lengths = bench.packed_documents(1000, 40)
    assert sum(lengths) == 1000 and min(lengths) >= 1 and max(lengths) < 80 and len(lengths) > 10
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert pos.shape == (1, 1000) and (pos[0, cu[:-1].long()] == 0).all()   # positions restart per document
    again = bench.packed_documents(1000, 40)
    assert again[2] == lengths                                               # the same rows for every config


def test_every_config_is_checked_before_any_point(tmp_path):
    """An unknown name: one line listing the valid ones, and nothing ran (no earlier configuration's point)."""
    with pytest.raises(ValueError) as e:
        bench.sweep(["naive", "sdpa_cudnn+bpp"], "tiny", 64, 64, 1, 1, 1024, 60.0, CPU, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "unknown configuration 'sdpa_cudnn+bpp'" in msg
    assert all(n in msg for n in bench.CONFIGS)
    assert not (tmp_path / "naive").exists()
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        bench.sweep(["naive"], "huge", 64, 64, 1, 1, 1024, 60.0, CPU, tmp_path)
    with pytest.raises(ValueError, match="doc_len"):
        bench.sweep(["flash+docs"], "tiny", 64, 64, 1, 1, 1024, 60.0, CPU, tmp_path, doc_len=0)


def test_flex_is_skipped_on_cpu_with_one_line(tmp_path):
    if bench.flex_training_unsupported(CPU) is None:
        pytest.skip(f"FlexAttention trains on CPU with torch {torch.__version__}: the sweep runs it")
    warned = []
    rows = bench.sweep(["flex+bp+docs", "flash+docs"], "tiny", 64, 64, 1, 1, 1024, 60.0, CPU, tmp_path,
                       warn=warned.append, doc_len=24)
    assert len(warned) == 1 and "\n" not in warned[0] and warned[0].startswith("bench_context: skipping flex+bp+docs: ")
    assert "FlexAttention" in warned[0] and "cpu" in warned[0]
    assert rows[0]["config"] == "flex+bp+docs" and rows[0]["status"].startswith("skipped: FlexAttention")
    docs = rows[1:]                                                         # the sweep went on
    assert [(r["config"], r["seq_len"], r["status"]) for r in docs] == [("flash+docs", 64, "ok")]
    assert all(r["documents"] > 1 for r in docs)
    assert "| skipped: FlexAttention" in bench.markdown_table(rows)
