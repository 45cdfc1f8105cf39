"""The Prune&Comp engine: the loop, compensation, metrics, and running the model layer by layer."""
