"""Model surgery on top of the core: modules selected by selector, replaced by a function.

Imports the core only.
"""
