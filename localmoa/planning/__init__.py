"""Planning: footprints and a budget in, waves out. Pure and deterministic: no I/O, no clock,
no backend; the caller reads the device and passes what it found."""
