//! Backends (in progress).
