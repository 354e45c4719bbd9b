"""Non-prefix KV reuse (CacheBlend-style): passages' KV reused wherever they stand, a few tokens recomputed.

``rope`` moves a stored passage's keys to its new positions; ``reference`` is the transformers oracle that
blends stored passages into a prompt's KV with a selection rule and measures it against a full prefill.
"""
