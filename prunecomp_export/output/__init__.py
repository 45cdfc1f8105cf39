"""Writing outputs: the pruned checkpoint by tensor surgery, the reload check, the output directory."""
