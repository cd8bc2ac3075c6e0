"""Deduplication: exact (sha256 of bytes and of pixels), perceptual (pHash + FAISS binary index)
and semantic (CLIP image embeddings + FAISS), as corpus-wide stages.

Every method works the same way (curate/dedup/common.py):

1. the rows are put in a deterministic order of preference (policy.preference_order:
   clip_score descending, then pixels of image 0 descending, then key ascending), so the
   result never depends on the order of the input shards;
2. the method finds pairs of near-identical samples (edges) with FAISS (search.py);
3. a keep policy (policy.py) turns edges into groups: SemDeDup-style greedy keeping by
   default, connected components as an option;
4. dropped rows get reason ``duplicate_<method>`` and detail "duplicate of <kept key>
   (<measure>)"; every member of a group of more than one gets ``meta.dedup.<method>.group``
   = the kept key.
"""
