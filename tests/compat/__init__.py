"""Bit-compatibility oracles: OpenZeppelin's merkle-tree (node), OpenGradient's SDK (.venv-og)."""
