"""The explorer: a backbone with its open galleries, each with fitted methods, scores, maps and
presets. What the page drives.
"""
