//! End-to-end tests and cloud simulators for Outrigger (see tests/ and hack/).
