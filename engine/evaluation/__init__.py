"""Scoring rankings: metrics, evaluation protocols, whole-gallery scores, paired statistics
between methods, parameter sweeps and presets.
"""
