//! Core DINO + KoLeo-proto library (see the module map as it grows).
