"""ElastiLM's model side: anchor layers, Taylor importance, one-shot reordering, nested levels, LoRA recovery."""
