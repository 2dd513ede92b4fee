"""hiermem: a workbench for pretraining language models with hierarchical parametric memories.

Layout (data flows top to bottom, imports only go upward):
    hiermem.data        corpus, long-tail facts and probes, tokenizer, cluster-packed sequences
    hiermem.embed       sentence embedders (MiniLM, fast static), cached on disk
    hiermem.retriever   hierarchical k-means tree and greedy routing
    hiermem.config      dataclass configs with YAML round trip and validation
    hiermem.model       anchor transformer (+ accounting)
    hiermem.memory      hierarchical memory bank and memory types (FFN / LoRA / KV)
    hiermem.train       training loop, sparse bank optimizer
    hiermem.evaluate    perplexity, knowledge probes, retrieval ablations
    hiermem.sweep       sweep plans and executors
    analysis            scaling-law fitting and knowledge attribution over tidy tables
"""

__version__ = "0.1.0"
