"""Data behind the page's plots: the kNN-graph layout and the 2-D embedding map."""
