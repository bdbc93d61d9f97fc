"""Several machines: models placed on the nodes of a Ray cluster (``pip install 'localmoa[ray]'``).

The planner stays the one owner of memory: each node's devices are bins like this machine's, and
Ray only runs what the plan placed (an actor per placed model, pinned to its node).

- :mod:`~localmoa.cluster.settings`: ``[settings.cluster]`` (no Ray needed to read it);
- :mod:`~localmoa.cluster.checks`: what must hold before connecting (the address allowed, Ray
  installed, token authentication), also without Ray;
- :mod:`~localmoa.cluster.ray_engine`: joining the cluster, the nodes' devices, where files are;
- :mod:`~localmoa.cluster.actors`: what runs on the nodes (inventory, model hosts);
- :mod:`~localmoa.cluster.backend`: the ``llamacpp`` backend on the cluster.

Only the first two may be imported without Ray installed; nothing here imports Ray until a
run asks for ``engine = "ray"``.
"""
