"""Scoring rankings: metrics, evaluation protocols, whole-gallery scores, parameter sweeps and
presets.
"""
