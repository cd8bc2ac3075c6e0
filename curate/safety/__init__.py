"""Safety stages: NSFW and watermark scores, face detection and blurring, blocklists and takedowns.

- `nsfw` (nsfw.py): NudeNet's detector (ONNX, shipped in the `nudenet` wheel) gives a nudity
  probability per image; the caption is screened against a word list (captions.py).
- `watermark` (watermark.py): a head on the CLIP image embedding (curate.models.watermark).
- `faces` (faces.py): OpenCV's bundled Haar cascade finds faces; boxes go to `meta`, and the
  stored image bytes can be blurred.
- `blocklist` / `blocklist_hashes` (blocklist.py): user lists of URLs, domains, sha256 and
  perceptual hashes (lists.py reads them); matching samples are dropped before download or
  right after it.
"""
