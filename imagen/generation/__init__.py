"""Generation engines. Only worker processes import the engines themselves (they import torch)."""
