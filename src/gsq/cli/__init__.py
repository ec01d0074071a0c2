"""Command-line interface (`gsq ...`, or `python -m gsq.cli ...`)."""
