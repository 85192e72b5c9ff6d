"""Asymmetric retrieval: SSP's small query model against a gallery embedded by the large
backbone."""
