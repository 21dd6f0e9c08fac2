"""How the shipped demo model is made: its training, architecture, the shapes language it learns, the judge that
reads its pictures, and a diagnosis of what it learnt. Run from the repository root (``make demo-model``); not part
of the installed package, which only loads the result from ``imagen/data/demo``."""
