"""Model families, one module each (see scaletrain/models/family.py); imported by load_families."""
