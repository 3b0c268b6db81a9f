//! Outrigger's API types (group `outrigger.dev`, version `v1alpha1`).
