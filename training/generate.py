"""Text in, text out: the sample printed at the end of training and by sample.py."""
import torch
from tokenizers import Tokenizer

from data.tokenizer import eot_token_id


@torch.no_grad()
def generate_text(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int | None, device: torch.device, autocast) -> str:
    """The prompt followed by max_new_tokens generated tokens, decoded. temperature=0 is greedy.

    An empty prompt starts from the end-of-document token, i.e. from the start of a new document.
    autocast: a zero-argument callable returning the forward's autocast context.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eot_token_id(tokenizer)]
    model.eval()
    with autocast():
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k)
    model.train()
    return tokenizer.decode(out[0].tolist())  # skips the end-of-document token
