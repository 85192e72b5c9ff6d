"""The bottom floor every concept uses: shared types, kNN primitives, storage, device, threads,
background jobs, logging.
"""
