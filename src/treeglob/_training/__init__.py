"""Training on top of the core: the optax wrappers (one factory, `wrapper`), recipes
(weight decay, freezing, scales), layer-wise decay, metrics and shardings.

Imports the core and `treeglob.presets` only.
"""
