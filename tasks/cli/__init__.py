"""Command-line tools beside the steps: sample, ui, embed, profile (python -m tasks.cli.<name>)."""
