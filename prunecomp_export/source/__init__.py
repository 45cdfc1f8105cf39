"""Where a run's inputs come from: the model's files, its config and tokenizer, and the text corpora."""
