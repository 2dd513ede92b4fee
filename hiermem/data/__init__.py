"""Data: real-text corpus, long-tail facts and probes, synthetic bioS world, tokenizer, packing.

Modules (import the one you need; this package imports nothing heavy by itself):
    sources    one loader per real-text source (wiki leads, CIA Factbook, optional Debian/npm text)
    facts      relation tables from packages, templates, Zipf exposures, frequency buckets
    synthetic  the bioS world of invented people
    probes     probe tables: held-out-template fact probes, cloze probes, the SK/CK rule
    corpus     CorpusConfig presets, build_corpus / load_corpus / load_probes / load_facts
    tokenizer  byte-level BPE with single-digit tokens; EOT id 0, PAD id 1
    textutil   normalisation, windowing, stable ids, whole-word counts
"""
