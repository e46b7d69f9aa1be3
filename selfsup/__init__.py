"""selfsup: self-supervised visual representation learning, the SimCLR family and successors."""
__version__ = "0.1.0"
