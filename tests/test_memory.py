"""The memory plan changes memory, never the math: same loss and gradients with every setting."""
import copy

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from model.loss import chunked_cross_entropy
from training.memory import apply_memory_plan


def test_chunked_cross_entropy_matches_full_loss_and_gradients():
    h = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (2, 37))
    t[0, :5] = -100
    loss = chunked_cross_entropy(h, w, t, chunk=8)
    loss.backward()
    got = loss.detach(), h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.t()).view(-1, 50), t.view(-1), ignore_index=-100)
    ref.backward()
    for a, b in zip(got, (ref.detach(), h.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_cross_entropy_under_autocast_gives_param_dtype_grads():
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    t = torch.randint(0, 30, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, t, chunk=16)
        ref = F.cross_entropy(F.linear(h, w).float(), t)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2


def _loss_and_grads(model, batch):
    model.zero_grad()
    torch.manual_seed(1)   # the same dropout masks in every run
    _, loss = model(**batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["none", "block", "selective", "offload"])
@pytest.mark.parametrize("seq_chunk,loss_chunk", [(0, 0), (16, 0), (7, 13)], ids=["plain", "tiles16", "tiles7-13"])
@pytest.mark.parametrize("attention", ["reference", "naive"])
def test_memory_plan_keeps_loss_and_gradients(mode, seq_chunk, loss_chunk, attention):
    # "reference" runs our Triton kernels here (TRITON_INTERPRET=1): selective/offload start the
    # attention backward from the kept output; "naive" has no such backward and recomputes its forward.
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, mlp="swiglu",
                    attention=attention, dropout=0.0 if seq_chunk else 0.1)   # tiles draw other masks
    model = GPT(cfg)
    targets = torch.randint(0, 97, (2, 40))
    targets[0, :3] = -100
    batch = dict(input_ids=torch.randint(0, 97, (2, 40)), targets=targets,
                 cu_seqlens=torch.tensor([0, 10, 40, 80], dtype=torch.int32))
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    planned = apply_memory_plan(copy.deepcopy(model), mode, seq_chunk, loss_chunk)
    loss, grads = _loss_and_grads(planned, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert planned.state_dict().keys() == model.state_dict().keys()   # checkpoints stay compatible
    # evaluation and generation still work (no grad: nothing saved)
    with torch.no_grad():
        assert planned(**batch)[1] is not None
    planned.eval()
    assert planned.generate(batch["input_ids"][:1, :5], 3, temperature=0).shape == (1, 8)


def test_bad_memory_plan_raises():
    model = GPT(GPTConfig(vocab_size=10, seq_len=8, n_layer=1, n_head=1, d_model=8, attention="reference"))
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_memory_plan(model, "everything")
    with pytest.raises(ValueError, match="seq_chunk"):
        apply_memory_plan(model, "block", seq_chunk=-1)


def _saved_bytes(model, batch):
    """Bytes autograd keeps for backward during one forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, loss = model(**batch)
    return total, logits


def test_memory_plan_keeps_less_for_backward():
    # the plan must actually be in force, not only harmless: less saved, no full logits
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, seq_len=128, n_layer=2, n_head=4, d_model=32, attention="reference")
    batch = dict(input_ids=torch.randint(0, 500, (1, 128)), targets=torch.randint(0, 500, (1, 128)))
    plain, logits = _saved_bytes(GPT(cfg), batch)
    assert logits is not None
    for mode in ("block", "selective", "offload"):
        planned, logits = _saved_bytes(apply_memory_plan(GPT(cfg), mode, 32, 32), batch)
        assert logits is None and planned < plain / 4, (mode, planned, plain)


def test_peak_breakdown_replays_the_trace_to_its_peak():
    from training.memory_breakdown import NO_FRAME, ROOT, origin, peak_breakdown

    def frame(path, name):
        return {"filename": str(path), "name": name, "line": 1}
    gpt = [frame("/usr/lib/python3/site-packages/torch/nn/modules/linear.py", "forward"),
           frame(ROOT / "model/gpt.py", "finish_tile"), frame(ROOT / "training/memory.py", "backward")]
    adam = [frame("/x/site-packages/torch/optim/adamw.py", "_init_group"), frame(ROOT / "train.py", "train")]
    adam[1]["filename"] = "/elsewhere/train.py"           # a caller outside the repo: torch.optim names it
    trace = [
        {"action": "free_requested", "addr": 99, "size": 5},  # allocated before recording: ignored
        {"action": "alloc", "addr": 1, "size": 100, "frames": adam},
        {"action": "alloc", "addr": 2, "size": 50, "frames": gpt},
        {"action": "alloc", "addr": 3, "size": 30, "frames": []},
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 4, "size": 60, "frames": gpt},   # the peak: 100 + 30 + 60
        {"action": "free_requested", "addr": 4, "size": 60},
        {"action": "alloc", "addr": 5, "size": 10, "frames": gpt},
    ]
    b = peak_breakdown(trace)
    assert b.peak_bytes == 190
    assert b.by_origin == {"torch.optim (optimizer state)": 100, NO_FRAME: 30, "model/gpt.py:finish_tile": 60}
    assert origin(gpt) == "model/gpt.py:finish_tile"     # the innermost frame of the repository
    table = b.table(top=2)
    assert "| 1 other sites | 0.00 |" in table and "**total**" in table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_breakdown_on_cuda_attributes_a_model_step():
    from training.memory_breakdown import PeakBreakdown

    cfg = GPTConfig(vocab_size=512, seq_len=1024, n_layer=2, n_head=4, d_model=128, attention="flash")
    with PeakBreakdown() as pb:
        model = apply_memory_plan(GPT(cfg).cuda(), "offload", 256, 256)
        x = torch.randint(0, 512, (1, 1024), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, targets=x)
        loss.backward()
    b = pb.result
    assert b.peak_bytes >= sum(p.nbytes for p in model.parameters())
    assert any(k.startswith("training/memory.py") or k.startswith("kernels/") for k in b.by_origin), b.by_origin


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["selective", "offload"])
def test_memory_plan_on_cuda_keeps_gradients(mode):
    # the CUDA-only parts: side-stream copies to pinned memory and tile prefetch (offload), our kernels'
    # backward from the kept output; several tiles, GQA, documents
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, seq_len=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, attention="flash")
    model = GPT(cfg).cuda()
    targets = torch.randint(0, 97, (2, 200), device="cuda")
    batch = dict(input_ids=torch.randint(0, 97, (2, 200), device="cuda"), targets=targets,
                 cu_seqlens=torch.tensor([0, 50, 200, 400], dtype=torch.int32, device="cuda"))
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    planned = apply_memory_plan(copy.deepcopy(model), mode, 48, 64)
    if mode == "offload":   # cached pinned buffers of exactly the parked shapes are reused, harmlessly
        from training.memory import warm_host_memory
        warm_host_memory(planned, 2, 200, torch.float32)
    loss, grads = _loss_and_grads(planned, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
