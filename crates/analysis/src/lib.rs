//! Prototype-collapse analysis and evaluation (module map written with the code).
