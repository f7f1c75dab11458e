"""Command-line launchers (absl): ``python -m experiments.train`` / ``experiments.robustness``."""
