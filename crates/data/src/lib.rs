//! Data pipeline (see the module map as it grows).
