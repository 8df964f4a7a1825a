"""Sentence embeddings of the same sentences from two HF folders, computed by transformers; exit 1 unless identical.

Mean pooling over the last hidden state with the attention mask, then L2 normalisation: what
all-MiniLM-L6-v2's sentence-transformers modules (1_Pooling, Normalize) compute.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the network

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.utils import logging  # noqa: E402

logging.disable_progress_bar()
logging.set_verbosity_error()

SENTENCES = [
    "shardwise moves checkpoints between formats.",
    "A .nemo archive is a tar holding a config, weights and tokenizer files.",
    "The quick brown fox jumps over the lazy dog.",
]


def embed(folder: str) -> torch.Tensor:
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


original, round_tripped = embed(sys.argv[1]), embed(sys.argv[2])
print(f"{len(SENTENCES)} sentences, embeddings of shape {tuple(original.shape)}")
print(f"max |original - round-tripped| = {(original - round_tripped).abs().max().item():.3g}")
if not torch.equal(original, round_tripped):
    sys.exit("embeddings differ")
print("embeddings are identical")
