"""Deduplication: exact (sha256 of bytes and of pixels), perceptual (pHash + FAISS binary index)
and semantic (CLIP image embeddings + FAISS), as corpus-wide stages.

Every method works the same way (curate/dedup/common.py):

1. the rows are put in a deterministic order of preference by the stage's `keep:` list
   (policy.py; by default original pixels, then RGB and upright, then original bytes, then
   the position in the input), so the best copy of an image is the one kept;
2. the method finds pairs of near-identical samples (edges) with FAISS (search.py);
3. a keep policy (policy.py) turns edges into groups: SemDeDup-style greedy keeping by
   default, connected components as an option;
4. dropped rows get reason ``duplicate_<method>`` and detail "duplicate of <kept key>
   (<measure>); kept for <criterion>: <kept's value> vs <dropped's value>"; every member
   of a group of more than one gets ``meta.dedup.<method>.group`` = the kept key.
"""
