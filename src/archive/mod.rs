//! Tally's memory of what it read: the staging log that rebuilds the dataflow at a
//! restart, and the Parquet lake (staged facts, compacted days, daily aggregates).

pub mod columns;
pub mod compact;
pub mod history;
pub mod lake;
pub mod schedule;
pub mod stage;
pub mod staging;
