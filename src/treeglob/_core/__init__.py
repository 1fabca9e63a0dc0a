"""The selection core: paths, patterns, selectors, and the one resolution pipeline.

Imports nothing else of treeglob. `keys` and `frameworks` say what a path is
and what each framework's trees look like; `structure`, `stacking` and `tree`
view a tree once; `segment` and `pattern` compile globs; `selector` and
`conditions` are the selector language; `rules` and `resolve` turn rules into
per-leaf values; `report` and `table` show them (`explain`).
"""
