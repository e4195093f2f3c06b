//! Tally's memory of what it read. For now: the staging log.

pub mod staging;
