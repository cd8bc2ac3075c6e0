"""Writers of output shards (Parquet, WebDataset) and exporters to trainer formats."""
