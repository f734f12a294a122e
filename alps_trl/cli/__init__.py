"""Console entry points: `alps-localize` (head localization) and `alps-merge` (apply a saved delta)."""
