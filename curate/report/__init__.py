"""Reports on finished outputs: an offline HTML report (`curate inspect --html`) and its plots.

`reader` opens an output folder, `columns` reads score and size distributions from its shards,
`samples` picks kept and dropped examples, `thumbnails` turns image bytes into small data URIs,
`plots` draws the charts (`plot_pngs`), and `html` assembles the self-contained page.
"""
