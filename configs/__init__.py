"""Model and mesh presets (see configs/models.py)."""
