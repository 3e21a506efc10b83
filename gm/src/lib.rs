//! GM shards (issue 16). A director walks one open event's template; this crate holds its pure state machine
//! ([`walk`]): what to ask next, and how each answer moves the event on. The director's loop, its lease and
//! its record in the register build on it.

pub mod walk;

pub use walk::{Action, Outcome, Progress, SlotRequest};
