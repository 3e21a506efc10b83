//! What crosses process boundaries, defined once for the gateway, the tiers and the compositors.
//!
//! - [`token`]: the one rule for NATS subject tokens (UID segments, zones, factions, participants, names).
//! - [`dialog`]: [`Uid`], [`Kind`], the [`DialogResponse`] a caller gets and the [`DialogResult`] published
//!   to `RESULTS` for the compositors (one type on both sides, not a copy per side).
//! - [`gm`]: opening a GM event on a shard ([`gm::OpenEvent`], [`gm::Opened`]).
//! - [`subjects`]: subject builders and patterns, the request queue group, request limits and (feature
//!   `jetstream`) the settings of the results stream that both sides create.

pub mod dialog;
pub mod gm;
pub mod subjects;
pub mod token;

pub use dialog::{
    Classification, DialogResponse, DialogResult, Embedding, FinishReason, Kind, Npc, SlotInfo,
    Timings, Uid, Usage,
};
pub use subjects::{BODY_LIMIT, QUEUE_GROUP, REQUEST_SUBJECTS, RESULTS_SUBJECTS, nats_urls};
pub use token::{TokenError, check_token, valid_token};
