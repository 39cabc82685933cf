"""Suites: grids of runs (methods x settings x seeds) with budget profiles.

    python -m suites.run --list
    python -m suites.run ablation_masking --profile smoke
"""
