//! Collectives (see the module map as it grows).
