"""ElastiLM's prompt elastification: words of the refinable context, their scores, and the selection that keeps the
highest-scored ones to a token budget."""
