"""Write a checkpoint as a Hugging Face model directory: `python scripts/export_hf.py CKPT OUT`.

OUT then loads with transformers alone, without custom code (no trust_remote_code):

    AutoModelForCausalLM.from_pretrained(OUT)      # safetensors weights, float32 unless --dtype
    AutoTokenizer.from_pretrained(OUT)             # our BPE as a PreTrainedTokenizerFast

Our GPT is written as the standard architecture that computes exactly the same function, chosen by
GPTConfig's norm / mlp / pos:

    rmsnorm   + swiglu + rope     -> LlamaForCausalLM       GQA, biases, untied: all native
    layernorm + gelu   + rope     -> GPTNeoXForCausalLM     (Pythia's layout) when n_kv_head == n_head;
                                     Starcoder2ForCausalLM  with GQA, which NeoX does not have
    layernorm + gelu   + learned  -> GPT2LMHeadModel        GQA's kv heads written repeated (the same
                                                            function; GPT-2 has one kv head per query head)

Where the target always has a bias we have not (NeoX's MLP and LayerNorms, Starcoder2's and GPT-2's
LayerNorms, GPT-2's projections), it is written as zeros, which changes nothing. Other combinations,
and sliding-window attention, are refused with the field named. RoPE (theta, linear or YaRN scaling)
becomes the config's `rope_parameters`; before anything is written, the frequencies and attention
factor transformers derives from them are compared with model/rope.py's, and a mismatch is refused
rather than exported as a model that computes other logits.
"""
import argparse
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.tokenizer import eot_token_id  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from training.checkpoint import CheckpointError, load_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The checkpoint entries an export reads (a checkpoint trimmed to these exports too).
KEYS = ("model", "model_config", "tokenizer")
# transformers computes the RoPE frequencies in float32, ours in float64: they agree to <= 1e-7
# relative (measured for theta 1e4..1e7, head_dim 64..256); a formula difference is far larger.
ROPE_RTOL = 1e-5
# GELU with the tanh approximation, computed by torch's own kernel as ours is ("gelu_new" is the same
# formula written out in Python, a few ulps away).
GELU_TANH = "gelu_pytorch_tanh"
COMBINATIONS = "rmsnorm/swiglu/rope (Llama), layernorm/gelu/rope (GPT-NeoX, Starcoder2), layernorm/gelu/learned (GPT-2)"


class ExportError(Exception):
    """A model this exporter cannot write as an exact standard architecture, in one line."""


def architecture(c: GPTConfig) -> str:
    """The transformers model_type that computes what GPT(c) computes; ExportError if there is none."""
    if c.window >= 0:
        raise ExportError(f"GPTConfig.window={c.window}: sliding-window attention is not exported "
                          "(Llama, GPT-NeoX and GPT-2 attend to the whole context)")
    combination = (c.norm, c.mlp, c.pos)
    if combination == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    if combination == ("layernorm", "gelu", "rope"):
        return "gpt_neox" if c.n_kv_head == c.n_head else "starcoder2"
    if combination == ("layernorm", "gelu", "learned"):
        return "gpt2"
    raise ExportError(f"GPTConfig norm={c.norm!r}, mlp={c.mlp!r}, pos={c.pos!r}: no standard Hugging Face "
                      f"architecture computes this combination; exported are norm/mlp/pos {COMBINATIONS}")


def rope_parameters(c: GPTConfig) -> dict:
    """model/rope.py's settings in transformers' `rope_parameters` form."""
    if c.rope_scaling_factor == 1.0:
        return {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling == "linear":
        return {"rope_type": "linear", "rope_theta": c.rope_theta, "factor": c.rope_scaling_factor}
    return {"rope_type": "yarn", "rope_theta": c.rope_theta, "factor": c.rope_scaling_factor,
            "original_max_position_embeddings": c.rope_original_seq_len}


def hf_config(model: GPT, arch: str, special_ids: dict) -> transformers.PreTrainedConfig:
    """The config of `arch` for model's shape. max_position_embeddings is seq_len, the context the model
    was trained (or extended) to: with YaRN that is the original context times the factor, as
    transformers expects. Dropout goes where the architecture has ours (embeddings and residual branches;
    never attention probabilities); Llama has none."""
    c = model.config
    eps = model.norm_f.eps
    common = dict(vocab_size=c.vocab_size, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  tie_word_embeddings=c.tie_embeddings, **special_ids)
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=c.seq_len, n_embd=c.d_model, n_inner=c.d_ff, activation_function=GELU_TANH,
            layer_norm_epsilon=eps, embd_pdrop=c.dropout, resid_pdrop=c.dropout, attn_pdrop=0.0, **common)
    rope = rope_parameters(c)
    shape = dict(hidden_size=c.d_model, intermediate_size=c.d_ff, max_position_embeddings=c.seq_len)
    if arch == "llama":
        return transformers.LlamaConfig(
            num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, hidden_act="silu", rms_norm_eps=eps,
            attention_bias=c.bias, mlp_bias=c.bias, attention_dropout=0.0, rope_parameters=rope, **shape, **common)
    if arch == "gpt_neox":
        # partial_rotary_factor: NeoX rotates a quarter of each head unless told otherwise; we rotate all of it.
        return transformers.GPTNeoXConfig(
            hidden_act=GELU_TANH, layer_norm_eps=eps, use_parallel_residual=False, attention_bias=c.bias,
            hidden_dropout=c.dropout, attention_dropout=0.0, rope_parameters={**rope, "partial_rotary_factor": 1.0},
            **shape, **common)
    return transformers.Starcoder2Config(
        num_key_value_heads=c.n_kv_head, hidden_act=GELU_TANH, norm_epsilon=eps, use_bias=c.bias,
        sliding_window=None, embedding_dropout=c.dropout, residual_dropout=c.dropout, attention_dropout=0.0,
        rope_parameters=rope, **shape, **common)


def hf_weights(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under `arch`'s parameter names, in its layouts (every tensor contiguous)."""
    c = model.config
    hd = c.head_dim
    blocks = {}
    for i, b in enumerate(model.blocks):
        # qkv rows: n_head query heads, then n_kv_head key heads, then n_kv_head value heads.
        sizes = [c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd]
        q, k, v = b.attn.qkv.weight.split(sizes)
        qb, kb, vb = _bias(b.attn.qkv).split(sizes)
        fc_w, fc_b = b.mlp.fc.weight, _bias(b.mlp.fc)
        if arch == "llama":
            gate, up = fc_w.chunk(2)                                 # the order of MLP.forward's chunk
            gate_b, up_b = fc_b.chunk(2)
            layer = {"input_layernorm.weight": b.norm1.weight, "post_attention_layernorm.weight": b.norm2.weight,
                     "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
                     "self_attn.o_proj.weight": b.attn.proj.weight,
                     "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": b.mlp.proj.weight}
            if c.bias:
                layer |= {"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb,
                          "self_attn.o_proj.bias": b.attn.proj.bias,
                          "mlp.gate_proj.bias": gate_b, "mlp.up_proj.bias": up_b, "mlp.down_proj.bias": b.mlp.proj.bias}
        elif arch == "starcoder2":
            layer = {**_norms(b, "input_layernorm", "post_attention_layernorm"),
                     "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
                     "self_attn.o_proj.weight": b.attn.proj.weight,
                     "mlp.c_fc.weight": fc_w, "mlp.c_proj.weight": b.mlp.proj.weight}
            if c.bias:
                layer |= {"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb,
                          "self_attn.o_proj.bias": b.attn.proj.bias,
                          "mlp.c_fc.bias": fc_b, "mlp.c_proj.bias": b.mlp.proj.bias}
        elif arch == "gpt_neox":
            layer = {**_norms(b, "input_layernorm", "post_attention_layernorm"),
                     "attention.query_key_value.weight": _per_head(c, q, k, v),
                     "attention.dense.weight": b.attn.proj.weight,
                     "mlp.dense_h_to_4h.weight": fc_w, "mlp.dense_h_to_4h.bias": fc_b,
                     "mlp.dense_4h_to_h.weight": b.mlp.proj.weight, "mlp.dense_4h_to_h.bias": _bias(b.mlp.proj)}
            if c.bias:
                layer |= {"attention.query_key_value.bias": _per_head(c, qb, kb, vb), "attention.dense.bias": b.attn.proj.bias}
        else:  # gpt2: Conv1D keeps weights as (in, out)
            layer = {**_norms(b, "ln_1", "ln_2"),
                     "attn.c_attn.weight": torch.cat([q, _all_heads(c, k), _all_heads(c, v)]).T,
                     "attn.c_attn.bias": torch.cat([qb, _all_heads(c, kb), _all_heads(c, vb)]),
                     "attn.c_proj.weight": b.attn.proj.weight.T, "attn.c_proj.bias": _bias(b.attn.proj),
                     "mlp.c_fc.weight": fc_w.T, "mlp.c_fc.bias": fc_b,
                     "mlp.c_proj.weight": b.mlp.proj.weight.T, "mlp.c_proj.bias": _bias(b.mlp.proj)}
        blocks |= {f"{i}.{name}": t for name, t in layer.items()}

    if arch == "gpt2":
        weights = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
                   **_norms(model, "transformer.ln_f", norm="norm_f"),
                   **{f"transformer.h.{name}": t for name, t in blocks.items()}}
    elif arch == "gpt_neox":
        weights = {"gpt_neox.embed_in.weight": model.tok_emb.weight,
                   **_norms(model, "gpt_neox.final_layer_norm", norm="norm_f"),
                   **{f"gpt_neox.layers.{name}": t for name, t in blocks.items()}}
    else:
        weights = {"model.embed_tokens.weight": model.tok_emb.weight,
                   **(_norms(model, "model.norm", norm="norm_f") if arch == "starcoder2"
                      else {"model.norm.weight": model.norm_f.weight}),
                   **{f"model.layers.{name}": t for name, t in blocks.items()}}
    weights["lm_head.weight"] = model.lm_head.weight                 # tied: the embedding's own tensor
    return {name: t.detach().contiguous() for name, t in weights.items()}


def _bias(linear: torch.nn.Linear) -> torch.Tensor:
    """A Linear's bias, or the zeros a target that always has one gets in its place."""
    return linear.bias if linear.bias is not None else torch.zeros(linear.out_features, dtype=linear.weight.dtype)


def _per_head(c: GPTConfig, q, k, v) -> torch.Tensor:
    """q, k, v rows (weight or bias) in GPT-NeoX's fused order: q, k, v of head 0, then of head 1, ..."""
    return torch.stack([t.view(c.n_head, c.head_dim, *t.shape[1:]) for t in (q, k, v)], 1).flatten(0, 2)


def _all_heads(c: GPTConfig, kv: torch.Tensor) -> torch.Tensor:
    """k or v rows of n_kv_head heads repeated to n_head, query head h's beside it: as attention() groups
    them (h reads kv head h // (n_head / n_kv_head)), for GPT-2's c_attn, which holds n_head of each."""
    heads = kv.view(c.n_kv_head, c.head_dim, *kv.shape[1:])
    return heads.repeat_interleave(c.n_head // c.n_kv_head, 0).flatten(0, 1)


def _norms(module, *names: str, norm: str | None = None) -> dict[str, torch.Tensor]:
    """LayerNorm weight and bias (zeros when ours has none) under the target's names: norm1, norm2 of
    a block, or the named `norm` of the model."""
    ours = [getattr(module, norm)] if norm else [module.norm1, module.norm2]
    out = {}
    for name, ln in zip(names, ours):
        out[f"{name}.weight"] = ln.weight
        out[f"{name}.bias"] = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)
    return out


def check_rope(model: GPT, hf_model: transformers.PreTrainedModel) -> None:
    """Raise ExportError unless transformers' RoPE for this config has model/rope.py's frequencies and
    attention factor. transformers' own rotary class is built from the config, so this compares what
    the loaded model will compute, not our reading of its formulas."""
    c = model.config
    rotary = getattr(hf_model.base_model, "rotary_emb", None)
    if model.rope is None or rotary is None:
        return
    theirs = type(rotary)(config=hf_model.config)                 # a real one: the model's is on "meta"
    ours = model.rope.inv_freq()
    if theirs.inv_freq.shape != ours.shape:
        problem = f"rotates {2 * theirs.inv_freq.numel()} of each head's {c.head_dim} channels, ours all"
    else:
        freq_diff = ((theirs.inv_freq.double() - ours) / ours).abs().max().item()
        scale_diff = abs(theirs.attention_scaling - model.rope.attention_scale)
        if freq_diff <= ROPE_RTOL and scale_diff <= ROPE_RTOL:
            return
        problem = f"frequencies differ by up to {freq_diff:.1%}, the attention factor by {scale_diff:.2g}"
    raise ExportError(f"GPTConfig.rope_scaling={c.rope_scaling!r} (factor {c.rope_scaling_factor}, theta "
                      f"{c.rope_theta}): transformers' {rotary.rope_type!r} RoPE is not model/rope.py's: {problem}; "
                      "not exported, as it would compute other logits")


def export(ckpt: dict, out: Path, dtype: torch.dtype = torch.float32) -> str:
    """Write ckpt's model and tokenizer to out as a Hugging Face directory; returns the architecture
    class name. Raises ExportError, before writing anything, for what cannot be exported exactly."""
    try:
        config = GPTConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"model_config: {e}") from None
    arch = architecture(config)
    with torch.device("meta"):                                       # no memory, no init: weights are assigned
        model = GPT(config)
    model.load_state_dict(ckpt["model"], assign=True)

    tokenizer = Tokenizer.from_str(ckpt["tokenizer"])
    try:
        eot = eot_token_id(tokenizer)
    except ValueError as e:
        raise ExportError(str(e)) from None
    # One token marks document boundaries in our data (it ends every document, so it also precedes
    # each): GPT-2's convention of bos = eos; it is the padding too, since there is no other.
    special_ids = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    hf_cfg = hf_config(model, arch, special_ids)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    check_rope(model, hf_model)

    weights = {name: t.to(dtype) for name, t in hf_weights(model, arch).items()}
    if config.tie_embeddings:
        del weights["lm_head.weight"]                                # tie_weights() points it at the embedding
    missing, unexpected = hf_model.load_state_dict(weights, strict=False, assign=True)
    if unexpected or set(missing) != ({"lm_head.weight"} if config.tie_embeddings else set()):
        raise RuntimeError(f"export mapping for {arch} is incomplete: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    hf_model.generation_config = transformers.GenerationConfig(**special_ids)

    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    eot_token = tokenizer.id_to_token(eot)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=eot_token, eos_token=eot_token, pad_token=eot_token,
        unk_token=getattr(tokenizer.model, "unk_token", None), model_max_length=config.seq_len,
        # decode() gives back the text exactly, as ours does; written out because transformers 4.x
        # defaults to True, which deletes the space before punctuation
        clean_up_tokenization_spaces=False,
    ).save_pretrained(out)
    return type(hf_model).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step_*.pt or latest.pt written by train.py")
    parser.add_argument("out", help="the directory to write (created; must be empty unless --force)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="dtype of the written weights")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT, replacing an earlier export's files (others stay)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    # Arguments first, one line each, before a (possibly many-GiB) checkpoint is read.
    if not args.checkpoint:
        problem = "no checkpoint given (make export: CKPT=path; by default the newest outputs/*/*/checkpoints/latest.pt)"
    elif not args.out:
        problem = "no output directory given (make export: OUT=dir)"
    elif out.exists() and not out.is_dir():
        problem = f"OUT {out} is a file, not a directory"
    elif out.is_dir() and any(out.iterdir()) and not args.force:
        problem = f"OUT {out} is not empty; pass --force to write into it"
    else:
        problem = None
        try:
            name = export(load_checkpoint(args.checkpoint, keys=KEYS), out, DTYPES[args.dtype])
        except (CheckpointError, ExportError) as e:
            problem = str(e)
    if problem:
        print(f"export_hf.py: {problem}", file=sys.stderr)
        return 2
    print(f"wrote {name} ({args.dtype}) to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
