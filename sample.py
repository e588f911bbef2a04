"""Generate text from a checkpoint: `python sample.py outputs/.../checkpoints/latest.pt --prompt "def "`.

The checkpoint carries everything needed: the model's config, its weights and the tokenizer itself,
so this works on any machine, without the data cache or the training configs. A step_*.dcp directory of
a job of several processes is read whole by this one process (training/checkpoint.py).
"""
import argparse
import functools
import sys

import torch
from tokenizers import Tokenizer

from model import GPT, GPTConfig
from training.checkpoint import CheckpointError, load_checkpoint
from training.device import autocast, resolve_device
from training.generate import generate_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step_*.pt, step_*.dcp or latest.pt written by train.py")
    parser.add_argument("--prompt", default="def ", help="text to continue ('' starts a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    # Every backend computes the same function, so a model trained with "flash" on a GPU samples on a CPU.
    parser.add_argument("--attention", default="auto", help="attention backend (see model.GPTConfig)")
    args = parser.parse_args()

    try:
        ckpt = load_checkpoint(args.checkpoint, keys=("step", "model", "model_config", "tokenizer"))
    except CheckpointError as e:   # one line naming the file, no traceback
        print(f"error: checkpoint {e}", file=sys.stderr)
        sys.exit(2)
    device = resolve_device(args.device)
    model = GPT(GPTConfig(**{**ckpt["model_config"], "attention": args.attention})).to(device)
    model.load_state_dict(ckpt["model"])
    tokenizer = Tokenizer.from_str(ckpt["tokenizer"])
    amp = functools.partial(autocast, args.precision, device)
    torch.manual_seed(args.seed)
    print(f"step {ckpt['step']} of {args.checkpoint}")
    for _ in range(args.num_samples):
        text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k or None, device=device, autocast=amp)
        print(f"---\n{text}")


if __name__ == "__main__":
    main()
