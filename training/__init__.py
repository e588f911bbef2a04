"""What train.py composes, one concept per module:

validate    the whole config checked up front; ConfigError -> one `config error: ...` line
device      device and autocast precision, peak FLOP/s for MFU, peak memory
optim       AdamW and the warmup + cosine learning-rate schedule
rng         seeding, and saving/restoring every RNG for exact resumes
checkpoint  atomic save, latest.pt, load with weights_only=True; CheckpointError for bad files
logger      metrics.jsonl and Weights & Biases (online / offline / none)
evaluate    validation loss and perplexity, passkey accuracy
eval_tokens the same target tokens for every context: pieces, windows, scores (scripts/experiment.py)
distributed torchrun jobs: process group, (dp, cp) mesh, FSDP2, the global batch split, loss weighted to the global mean
context_parallel  ring attention over the cp ranks with our kernel, head-tail sharding
generate    text from a prompt (the end-of-training sample, sample.py)
"""
