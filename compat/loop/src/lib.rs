//! stock path (in progress).
