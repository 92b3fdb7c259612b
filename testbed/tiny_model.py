"""``python -m testbed.tiny_model DIR``: save a tiny Llama (built from a config) for the testbed's server.

Run as its own process so the testbed itself never imports torch or transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Write a tiny Llama (8 blocks, width 64) as a Hugging Face directory at ``argv[0]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m testbed.tiny_model DIR", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import save_pretrained_dir, tiny_config

    # 8 blocks so a 4-stage plan has middle partitions to hand to helpers.
    save_pretrained_dir(AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=8)), None, Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
