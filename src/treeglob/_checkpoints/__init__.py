"""Checkpoints: one module per format behind one registry (`formats`), model factories
(`sources`), and transfer by rules (`rename`, `transforms`, `transfer`, `load_report`).

Imports the core only.
"""
