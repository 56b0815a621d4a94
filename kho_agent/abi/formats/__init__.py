"""One module per KHO/LUO format version, each exporting one record (records.py).

This package imports none of them: registry.py lists them, explicitly, one line each.
"""
