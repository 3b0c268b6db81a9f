//! Outrigger's placement solver.
