"""Text conditioners, one file each (``models/text.py``: the seam). Every module here registers
itself; ``load_conditioners`` imports them all, so a new conditioner is one new file."""
