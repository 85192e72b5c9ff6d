"""Galleries and search: the faiss / torch index, the gallery with its caches, zip extraction and
allowed folders.
"""
