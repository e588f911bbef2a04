"""training/eval_tokens.py: the identical-token evaluation E3 and E4 score their models with.

The property that matters: two models of different contexts score exactly the same target tokens (the
same count, the same (document, position) pairs, the same target ids), and the losses they report are
the model's own next-token losses at those positions, given the context their windows provide.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.loader import BatchLoader
from data.packing import PackedTokens
from model import GPT, GPTConfig
from training.eval_tokens import TokenScores, cut_pieces, position_bins, score, select_pieces, windows

V = 97
# document lengths (each ends with EOT = 0): one token (nothing to predict), two, odd, one longer than a piece
DOC_LENGTHS = [1, 2, 17, 97, 130, 41]
LENGTH = 64   # piece length: the "longest context" of these tests


@pytest.fixture(scope="module")
def split():
    """A packed split's (tokens, doc_starts): random ids in 1..V-1, each document closed by EOT (0)."""
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, V, size=n - 1), 0) for n in DOC_LENGTHS]
    return np.concatenate(docs).astype(np.uint16), np.cumsum([0, *DOC_LENGTHS[:-1]]).astype(np.int64)


@pytest.fixture(scope="module")
def model():
    """A tiny causal GPT (random weights): its losses depend on every token of context it gets."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=V, seq_len=LENGTH, n_layer=2, n_head=2, d_model=32, attention="sdpa",
                       sdpa_backend="math")
    return GPT(config).eval()


def model_fn(model):
    return lambda input_ids: model(input_ids)[0]


@pytest.mark.parametrize("n", [0, 1, 2, 17, 97, 1025])
@pytest.mark.parametrize("context, stride", [(1, 1), (3, 2), (16, 16), (16, 8), (16, 1), (64, 32), (2048, 2048)])
def test_windows_tile_the_targets(n, context, stride):
    """Every target position 1..n-1 is scored by exactly one window, which reads at most `context` tokens,
    all before the target and inside the piece; past the first window a target keeps context - stride + 1."""
    scored = []
    for start, end, first in windows(n, context, stride):
        assert 0 <= start < first < end <= n and end - 1 - start <= context
        scored += range(first, end)
        if start > 0:
            assert first - start >= context - stride + 1
    assert scored == list(range(1, n))


def test_windows_reject_a_stride_past_the_context():
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def test_pieces_cover_each_document_once(split):
    """Pieces of at most LENGTH + 1 tokens, one token shared between neighbours, so each document token
    but the first is a target of one piece; the one-token document has none."""
    tokens, doc_starts = split
    pieces = cut_pieces(doc_starts, len(tokens), LENGTH)
    assert (pieces[:, 3] - pieces[:, 2] <= LENGTH + 1).all()
    for doc, (first, n) in enumerate(zip(doc_starts, DOC_LENGTHS)):
        mine = pieces[pieces[:, 0] == doc]
        targets = [t for _, _, start, stop in mine for t in range(start + 1, stop)]
        assert targets == list(range(first + 1, first + n))
    assert pieces[:, 0].tolist() == [1, 2, 3, 3, 4, 4, 4, 5]


def test_select_pieces_round_robin_and_budget(split):
    tokens, doc_starts = split
    pieces = cut_pieces(doc_starts, len(tokens), LENGTH)
    assert np.array_equal(select_pieces(pieces, None), pieces)
    # first pieces of docs 1..5 hold 1 + 16 + 64 + 64 + 40 = 185 targets; 200 adds 15 of doc 3's second piece
    chosen = select_pieces(pieces, 200)
    assert (chosen[:, 3] - chosen[:, 2] - 1).sum() == 200
    assert chosen[:, :2].tolist() == [[1, 0], [2, 0], [3, 0], [3, 1], [4, 0], [5, 0]]
    assert chosen[3, 3] - chosen[3, 2] - 1 == 15


def test_position_bins():
    assert position_bins(16384)[:4] == [1, 2, 4, 8] and position_bins(16384)[-2:] == [8192, 16385]
    assert position_bins(100) == [1, 2, 4, 8, 16, 32, 64, 101]
    assert position_bins(1) == [1, 2]


def test_contexts_score_identical_tokens(split, model):
    """Different contexts and strides: the same count, (document, position) pairs, target ids and digest;
    the losses differ (the model sees different context)."""
    tokens, doc_starts = split
    pieces = select_pieces(cut_pieces(doc_starts, len(tokens), LENGTH), None)
    results = [score(model_fn(model), tokens, doc_starts, pieces, context, stride, batch_rows)
               for context, stride, batch_rows in ((8, 8, 3), (16, 8, 5), (64, 64, 2), (64, 32, 7))]
    first = results[0]
    expected = [(doc, p) for doc, n in enumerate(DOC_LENGTHS) for p in range(1, n)]
    assert list(zip(first.doc.tolist(), first.doc_position.tolist())) == expected
    assert np.array_equal(first.target, np.concatenate([tokens[s + 1:s + n] for s, n in zip(doc_starts, DOC_LENGTHS)]))
    for other in results[1:]:
        assert np.array_equal(other.doc, first.doc) and np.array_equal(other.doc_position, first.doc_position)
        assert np.array_equal(other.target, first.target) and other.digest() == first.digest()
        assert not np.allclose(other.loss, first.loss)
    summaries = [r.summary(position_bins(LENGTH)) for r in results]
    assert len({s["tokens"] for s in summaries}) == 1 and len({tuple(s["tokens_by_bin"]) for s in summaries}) == 1


@pytest.mark.parametrize("context, stride", [(64, 64), (16, 16), (16, 4)])
def test_losses_match_a_direct_computation(split, model, context, stride):
    """Each target's loss is the model's loss on exactly the tokens its window holds: for target p of a
    piece, the window starting at w * stride with w = max(0, ceil((p - context) / stride)); computed here one
    target at a time, unbatched and unpadded. The loss by position bin is the mean over the bin's targets."""
    tokens, doc_starts = split
    pieces = select_pieces(cut_pieces(doc_starts, len(tokens), LENGTH), None)
    scores = score(model_fn(model), tokens, doc_starts, pieces, context, stride, batch_rows=4)
    direct = []
    with torch.no_grad():
        for _, _, start, stop in pieces:
            piece = torch.from_numpy(tokens[start:stop].astype(np.int64))
            for p in range(1, len(piece)):
                a = max(0, -(-(p - context) // stride)) * stride
                logits = model(piece[None, a:p])[0][0, -1]
                direct.append(F.cross_entropy(logits, piece[p]).item())
    # fp32 forward passes of different shapes (batched, right-padded) sum in different orders
    np.testing.assert_allclose(scores.loss, direct, rtol=0, atol=1e-5)

    edges = position_bins(LENGTH)
    summary = scores.summary(edges)
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        in_bin = [d for d, p in zip(direct, scores.position) if lo <= p < hi]
        assert summary["tokens_by_bin"][i] == len(in_bin)
        assert summary["loss_by_bin"][i] == (pytest.approx(np.mean(in_bin), abs=1e-5) if in_bin else None)
    assert summary["loss"] == pytest.approx(np.mean(direct), abs=1e-5)


def test_digest_tells_apart_other_tokens():
    """Same targets at other positions, or other targets at the same positions: another digest."""
    base = TokenScores(doc=np.array([0, 0, 1]), doc_position=np.array([1, 2, 1]), position=np.array([1, 2, 1]),
                       target=np.array([5, 6, 7]), loss=np.zeros(3))
    moved = TokenScores(**{**vars(base), "doc_position": np.array([1, 3, 1])})
    other = TokenScores(**{**vars(base), "target": np.array([5, 6, 8])})
    assert len({base.digest(), moved.digest(), other.digest()}) == 3


def test_loader_windows_score_different_tokens(split, tmp_path):
    """What E3 and E4 did before: val windows from the BatchLoader at each model's length, the same seed and
    the same number of targets. Offsets are drawn from [0, N - T), so the two lengths score different
    tokens: this evaluation fails the identity test_contexts_score_identical_tokens asserts."""
    tokens, doc_starts = split
    np.save(tmp_path / "val_tokens.npy", tokens)
    np.save(tmp_path / "val_doc_starts.npy", doc_starts)
    packed = PackedTokens(tmp_path, "val")

    def targets(seq_len, n_windows):
        loader = BatchLoader(packed, 1, seq_len, seed=0)
        scored = torch.cat([next(loader)["targets"] for _ in range(n_windows)], dim=1).flatten().numpy()
        return np.sort(scored[scored != -100])

    assert not np.array_equal(targets(16, 8), targets(64, 2))
