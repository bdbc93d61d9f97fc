"""Several machines: models placed on the nodes of a Ray cluster (``pip install 'localmoa[ray]'``).

The planner stays the one owner of memory: each node's devices are bins like this machine's, and
Ray only runs what the plan placed (an actor per placed model, pinned to its node).
"""
