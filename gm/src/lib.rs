//! GM shards (issue 16). A director walks one open event's template; this crate holds its pure state machine
//! ([`walk`]): what to ask next, and how each answer moves the event on; the register ([`register`]): each
//! open event's progress and lease in PostgreSQL; one director's loop ([`director`]) and its services over NATS
//! ([`nats`]); the check of open requests and the shard map ([`open`]); and the loop of one shard in a process
//! ([`shard`]): open requests, leases, takeovers, one director task per held event. [`city`] drives and
//! samples a self-running city (the events bench).

pub mod city;
pub mod director;
mod error;
pub mod nats;
pub mod open;
pub mod register;
pub mod shard;
pub mod walk;

pub use director::{Ask, Finished, Services};
pub use error::{GmError, Result};
pub use nats::NatsServices;
pub use open::{OpenError, OpenPlan, Templates};
pub use register::{Lease, Register};
pub use shard::Shard;
pub use walk::{Action, Outcome, Progress, SlotRequest};
