"""``python -m testbed.tiny_model DIR``: save a tiny Llama (built from a config) for the testbed's server.

Run as its own process so the testbed itself never imports torch or transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Write a tiny Llama (8 blocks, width 64) with the GPT-2 tokenizer as a Hugging Face directory at ``argv[0]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m testbed.tiny_model DIR", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import gpt2_tokenizer, save_pretrained_dir, tiny_config

    # The owners tokenize their text with the model's tokenizer, so the folder carries one
    # (GPT-2's BPE, shipped by a package) and the vocabulary matches it. 8 blocks so a
    # 4-stage plan has middle partitions to hand to helpers.
    tokenizer = gpt2_tokenizer()
    config = tiny_config("llama", num_hidden_layers=8, vocab_size=len(tokenizer))
    save_pretrained_dir(AutoModelForCausalLM.from_config(config), tokenizer, Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
