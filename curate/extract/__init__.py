"""Turning web pages into interleaved documents: charset detection, URL resolution, main-content
extraction with images in page order, and the document model the interleaved sources build samples from."""
