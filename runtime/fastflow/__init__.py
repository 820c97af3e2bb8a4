"""FastFlow: the UCB maths, the state file learned across runs, ``solve_with_state``
(imports the base layer, solving and this room)."""
