"""DIM (Dynamic Integration of Multimodal information) as a ranking linker.

    features.py    frozen mention-side / entity-side features with masks (text, image, expert cue)
    model.py       FusionConfig + DimFusion: projections, masked 8-head attention, FFN, cosine score
    pairs.py       cheap pair evidence (name match, years, BM25...) for the head's extra score term
    loss.py        N-pair loss with in-batch and hard negatives
    candidates.py  BM25 (names/aliases) UNION dense candidate generation, recall, DIM's candidate lists
    pipeline.py    what the linker and the trainer share (padded candidates, scoring)
    linker.py      DimLinker (`build_linker("dim", kb, preset)`), batched `pipe`
    train.py       `python -m mel train dim ...`
    enrich.py      `python -m mel kb enrich ...` (LLM-rewritten descriptions, off by default)

Submodules are imported on use, so `import mel.dim` stays cheap.
"""
