"""The tiny LM (TLM) of ElastiLM: all-MiniLM-L6-v2, a 6-layer BERT encoder (hidden 384), kept beside the LLM.

Owns the encoder's forward in plain PyTorch with every layer's hidden states (ElastiLM's dual-head TLM puts its heads
on them), its WordPiece tokenization, sentence embeddings (mean pooling, L2 normalisation, length-sorted batches), and
the service's load-once handle. Ignores HTTP and queueing (service/ and engine/) and the dual heads themselves.
"""
