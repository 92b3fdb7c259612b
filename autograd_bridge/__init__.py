"""Autograd bridge: split a Hugging Face causal LM into stages and train it across hosts."""
