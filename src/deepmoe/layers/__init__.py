"""Pure layer functions `f(params, cfg, x, ...) -> y`, one concern per module."""
