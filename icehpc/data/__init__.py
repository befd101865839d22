"""Data in: synthetic CPI-like images, WebDataset shard building and checking, and loaders."""
