"""Checkpoint conversion (L5): Hugging Face export and import (export.py, tools/convert_checkpoint.py) and upcycling
a dense checkpoint into an MoE one (upcycle.py, tools/upcycle.py)."""
