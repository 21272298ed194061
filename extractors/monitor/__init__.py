"""Eyes on production: out-of-distribution images (ood.py) and batch drift (drift.py)."""
