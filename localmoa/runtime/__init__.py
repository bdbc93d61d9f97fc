"""The runtime: the one engine that runs every plan, its memory seam, and the MoA semantics."""
