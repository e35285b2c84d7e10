"""GEMEL: generative multimodal entity linking (Shi et al., LREC-COLING 2024), on any causal LM.

    from mel.gemel import GemelLinker
    linker = GemelLinker(kb, preset, pool_data="../shared/data/wikimel")   # whole-KB trie (the paper)
    result = linker.link(Mention.from_text(caption, "Ryan", image="ryan.jpg"))

Modules:
    mapper   FeatureMapper (Linear d_vision -> k x d_embed visual tokens), the only trained part
    features the image vector the mapper maps: the image encoder's (paper) or the ConSE vector
    prompt   the paper's prompt template (and the `cue` variant, beyond the paper) and its assembly
             into input embeddings
    demos    DemonstrationPool: in-context examples retrieved by mention embedding
    trie     TokenTrie: prefix trie over the KB's names in the LLM's tokens (cached on disk)
    decode   constrained beam search with the KV cache; exhaustive scoring of a candidate set
    linker   GemelLinker and the gemel+dense / gemel+dim factories
    train    the mapper trainer (`python -m mel train gemel`)
"""
from .decode import DecodeConfig, beam_search, score_groups
from .demos import Demonstration, DemonstrationPool
from .linker import GemelLinker, gemel_with_bm25, gemel_with_dense, gemel_with_dim
from .mapper import FeatureMapper, MapperConfig
from .prompt import PromptBuilder, Segment, render_prompt
from .trie import TokenTrie, kb_trie

__all__ = ["GemelLinker", "gemel_with_bm25", "gemel_with_dense", "gemel_with_dim", "FeatureMapper", "MapperConfig", "DemonstrationPool",
           "Demonstration", "TokenTrie", "kb_trie", "PromptBuilder", "Segment", "render_prompt", "DecodeConfig",
           "beam_search", "score_groups"]
