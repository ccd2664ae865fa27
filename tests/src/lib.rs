//! Shared support for the multi-process scenarios under `tests/tests/`.
