"""prunecomp-export: remove whole decoder layers with Prune&Comp and ship a plain, smaller model."""

__version__ = "0.1.0"
