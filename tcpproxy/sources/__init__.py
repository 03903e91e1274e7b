"""Where configs come from: `file.py`, the config file (read bounded, watched)."""
