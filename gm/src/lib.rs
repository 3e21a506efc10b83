//! GM shards (issue 16). A director walks one open event's template; this crate holds its pure state machine
//! ([`walk`]): what to ask next, and how each answer moves the event on; and the register ([`register`]): each
//! open event's progress and lease in PostgreSQL. The director's loop builds on both.

pub mod director;
mod error;
pub mod nats;
pub mod register;
pub mod walk;

pub use director::{Ask, Finished, Services};
pub use error::{GmError, Result};
pub use nats::NatsServices;
pub use register::{Lease, Register};
pub use walk::{Action, Outcome, Progress, SlotRequest};
