//! The director's walk over one open event: a pure state machine over its template.
//!
//! [`Progress`] is all a director knows about its event (serializable: it is what the register keeps, so a
//! director respawned elsewhere continues from it). [`Progress::actions`] says what to do now, one action per
//! running scene (scenes without `after` run in parallel): ask the gateway for a slot's line, classify a line
//! for its gate, or classify a scene's text for its branch. [`Progress::apply`] takes the answer and moves the
//! event on: a gate's accepted label keeps the line, another asks again until the slot's attempts run out (the
//! slot is then given up: no line; an empty answer counts as a rejection), a branch label starts the scene it
//! names or ends the path (a branch with nothing to classify ends it too), a finished scene starts the scenes
//! that waited for it. No I/O here: every rule is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use nimmer_config::template::{Missing, Template};
use nimmer_config::{EventTemplate, SlotTemplate, SlotWork};
use nimmer_wire::dialog::Kind;
use serde::{Deserialize, Serialize};

/// Attempts at a slot without a gate whose answers come back empty.
pub const EMPTY_ATTEMPTS: u32 = 3;
/// [`Progress::render`]'s answer for a branch with an empty input.
const NO_BRANCH: usize = usize::MAX;

/// Where one started scene is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SceneState {
    /// Asking for slot number `slot`, attempt `attempt` (from 1).
    Asking { slot: usize, attempt: u32 },
    /// Slot `slot`'s line waits for its gate.
    Gating {
        slot: usize,
        attempt: u32,
        line: String,
    },
    /// Every slot is done; the branch classifies.
    Branching,
    /// Done (with the branch label it took, if it has a branch).
    Done { label: Option<String> },
}

/// An open event's progress.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Every scene that has started, by id.
    pub scenes: BTreeMap<String, SceneState>,
    /// Accepted lines (a classify slot's label), by slot id.
    pub lines: BTreeMap<String, String>,
    /// Slots given up: no line accepted within their attempts, or a text they quote was given up.
    pub skipped: BTreeSet<String>,
}

/// What a slot asks the gateway for, rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotRequest {
    pub kind: Kind,
    pub npc: Option<String>,
    pub traits: BTreeMap<String, f32>,
    pub work: RenderedWork,
    pub participants: Vec<String>,
    pub faction: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RenderedWork {
    Line {
        system: Option<String>,
        prompt: String,
        max_tokens: Option<usize>,
    },
    Classify {
        classifier: String,
        input: String,
    },
}

/// One thing the director does next (at most one per running scene).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask for slot `slot` of `scene` (the line becomes canon only once accepted: see the gate).
    Ask {
        scene: String,
        slot: String,
        attempt: u32,
        request: SlotRequest,
    },
    /// Classify `input` (the slot's line, or its gate's input) with the gate's classifier.
    Gate {
        scene: String,
        slot: String,
        attempt: u32,
        classifier: String,
        input: String,
    },
    /// Classify `input` with the scene's branch classifier.
    Branch {
        scene: String,
        classifier: String,
        input: String,
    },
}

impl Action {
    /// `ask slot#attempt`, `gate slot#attempt` or `branch scene`, for logs.
    pub fn name(&self) -> String {
        match self {
            Action::Ask { slot, attempt, .. } => format!("ask {slot}#{attempt}"),
            Action::Gate { slot, attempt, .. } => format!("gate {slot}#{attempt}"),
            Action::Branch { scene, .. } => format!("branch {scene}"),
        }
    }
}

/// The answer to a scene's action.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The line for the slot being asked (a classify slot's label).
    Line { scene: String, text: String },
    /// A gate's or a branch's label.
    Label { scene: String, label: String },
}

/// An outcome that does not fit the progress (a stale or repeated answer, a label the classifier lacks).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{scene}: {message}")]
pub struct WalkError {
    pub scene: String,
    pub message: String,
}

impl Progress {
    /// A newly opened event: the scenes that start at open are asking for their first slot.
    pub fn open(t: &EventTemplate) -> Self {
        let mut p = Self::default();
        p.start_ready(t);
        p
    }

    /// Whether every started scene is done and no other can start.
    pub fn is_complete(&self) -> bool {
        self.scenes
            .values()
            .all(|s| matches!(s, SceneState::Done { .. }))
    }

    /// What to do now, rendered with the event's `values` (declared ones plus `event` and `district`). A slot
    /// whose texts quote a given-up slot is given up here too.
    pub fn actions(&mut self, t: &EventTemplate, values: &BTreeMap<String, String>) -> Vec<Action> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        // A given-up slot may finish its scene and start others: until no new scene appears.
        while let Some(id) = self.scenes.keys().find(|k| !seen.contains(*k)).cloned() {
            seen.insert(id.clone());
            while let Some(scene) = t.scene(&id) {
                match self.render(scene, &id, values) {
                    Ok(Some(a)) => out.push(a),
                    Ok(None) => {}
                    Err(NO_BRANCH) => {
                        // Nothing to classify: the scene ends without a branch.
                        self.scenes
                            .insert(id.clone(), SceneState::Done { label: None });
                        self.start_ready(t);
                        continue;
                    }
                    Err(slot) => {
                        self.skipped.insert(scene.slots[slot].id.clone());
                        self.advance(t, &id, slot);
                        continue;
                    }
                }
                break;
            }
        }
        out
    }

    /// The events this one raises as it completes: each raise's id, template and values rendered with this
    /// event's values and lines. A raise whose values quote a slot without a line (given up, or in a scene
    /// that never ran) is left out: what it would tell did not happen.
    pub fn raises(
        &self,
        t: &EventTemplate,
        values: &BTreeMap<String, String>,
    ) -> Vec<(String, String, BTreeMap<String, String>)> {
        t.raises
            .iter()
            .filter_map(|r| {
                let rendered = r
                    .values
                    .iter()
                    .map(|(k, v)| Some((k.clone(), v.render(values, &self.lines).ok()?)))
                    .collect::<Option<BTreeMap<_, _>>>()?;
                Some((r.id.clone(), r.template.clone(), rendered))
            })
            .collect()
    }

    /// The request of slot `slot` rendered as it was asked (its texts quote only earlier slots' lines).
    pub fn slot_request(
        &self,
        t: &EventTemplate,
        values: &BTreeMap<String, String>,
        slot: &str,
    ) -> Option<SlotRequest> {
        let x = t
            .scenes
            .iter()
            .flat_map(|s| &s.slots)
            .find(|x| x.id == slot)?;
        request(x, &|tpl: &Template| tpl.render(values, &self.lines)).ok()
    }

    /// The action of scene `id`, or `Err(slot)` when the slot's texts cannot be rendered (`Err(NO_BRANCH)`:
    /// the branch has nothing to classify).
    fn render(
        &self,
        scene: &nimmer_config::SceneTemplate,
        id: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<Option<Action>, usize> {
        let text = |tpl: &Template| tpl.render(values, &self.lines);
        Ok(Some(match &self.scenes[id] {
            SceneState::Asking { slot, attempt } => {
                let x = &scene.slots[*slot];
                Action::Ask {
                    scene: id.to_string(),
                    slot: x.id.clone(),
                    attempt: *attempt,
                    request: request(x, &text).map_err(|_| *slot)?,
                }
            }
            SceneState::Gating {
                slot,
                attempt,
                line,
            } => {
                let x = &scene.slots[*slot];
                let gate = x.gate.as_ref().expect("a gating slot has a gate");
                let input = match &gate.input {
                    Some(i) => text(i).map_err(|_| *slot)?,
                    None => line.clone(),
                };
                Action::Gate {
                    scene: id.to_string(),
                    slot: x.id.clone(),
                    attempt: *attempt,
                    classifier: gate.classifier.clone(),
                    input,
                }
            }
            SceneState::Branching => {
                let b = scene
                    .branch
                    .as_ref()
                    .expect("a branching scene has a branch");
                // A branch input quoting a given-up slot reads as empty text (see `actions`).
                let input = b.input.render(values, &self.lines).unwrap_or_default();
                if input.trim().is_empty() {
                    return Err(NO_BRANCH);
                }
                Action::Branch {
                    scene: id.to_string(),
                    classifier: b.classifier.clone(),
                    input,
                }
            }
            SceneState::Done { .. } => return Ok(None),
        }))
    }

    /// Moves the event on with the answer to a scene's action.
    pub fn apply(&mut self, t: &EventTemplate, outcome: Outcome) -> Result<(), WalkError> {
        let (Outcome::Line { scene: id, .. } | Outcome::Label { scene: id, .. }) = &outcome;
        let id = id.clone();
        let err = |message: String| WalkError {
            scene: id.clone(),
            message,
        };
        let scene = t
            .scene(&id)
            .ok_or_else(|| err("no such scene in the template".into()))?;
        let state = self
            .scenes
            .get(&id)
            .cloned()
            .ok_or_else(|| err("the scene has not started".into()))?;
        match (state, outcome) {
            (SceneState::Asking { slot, attempt }, Outcome::Line { text, .. })
                if text.trim().is_empty() =>
            {
                // An empty line is never a line: asked again like a gate's rejection.
                let x = &scene.slots[slot];
                let attempts = x.gate.as_ref().map_or(EMPTY_ATTEMPTS, |g| g.attempts);
                self.reject(t, &id, slot, attempt, attempts);
            }
            (SceneState::Asking { slot, attempt }, Outcome::Line { text, .. }) => {
                if scene.slots[slot].gate.is_some() {
                    self.scenes.insert(
                        id.clone(),
                        SceneState::Gating {
                            slot,
                            attempt,
                            line: text,
                        },
                    );
                } else {
                    self.lines.insert(scene.slots[slot].id.clone(), text);
                    self.advance(t, &id, slot);
                }
            }
            (
                SceneState::Gating {
                    slot,
                    attempt,
                    line,
                },
                Outcome::Label { label, .. },
            ) => {
                let x = &scene.slots[slot];
                let gate = x.gate.as_ref().expect("a gating slot has a gate");
                if gate.accept.contains(&label) {
                    self.lines.insert(x.id.clone(), line);
                    self.advance(t, &id, slot);
                } else {
                    self.reject(t, &id, slot, attempt, gate.attempts);
                }
            }
            (SceneState::Branching, Outcome::Label { label, .. }) => {
                let b = scene
                    .branch
                    .as_ref()
                    .expect("a branching scene has a branch");
                let to = b.on.get(&label).ok_or_else(|| {
                    err(format!("`{label}` is not a label of `{}`", b.classifier))
                })?;
                self.scenes
                    .insert(id.clone(), SceneState::Done { label: Some(label) });
                if let Some(to) = to {
                    self.scenes.entry(to.clone()).or_insert(SceneState::Asking {
                        slot: 0,
                        attempt: 1,
                    });
                }
                self.start_ready(t);
            }
            (state, o) => {
                return Err(err(format!(
                    "{o:?} does not fit the scene's state {state:?}"
                )));
            }
        }
        Ok(())
    }

    /// Slot `slot` of scene `id` had no usable line at `attempt`: asked again, or given up after `attempts`.
    fn reject(&mut self, t: &EventTemplate, id: &str, slot: usize, attempt: u32, attempts: u32) {
        if attempt >= attempts {
            let scene = t.scene(id).expect("a started scene is in the template");
            self.skipped.insert(scene.slots[slot].id.clone());
            self.advance(t, id, slot);
        } else {
            self.scenes.insert(
                id.to_string(),
                SceneState::Asking {
                    slot,
                    attempt: attempt + 1,
                },
            );
        }
    }

    /// After slot `slot` of scene `id`: the next slot, else the branch, else done (starting what waited).
    fn advance(&mut self, t: &EventTemplate, id: &str, slot: usize) {
        let scene = t.scene(id).expect("a started scene is in the template");
        let next = if slot + 1 < scene.slots.len() {
            SceneState::Asking {
                slot: slot + 1,
                attempt: 1,
            }
        } else if scene.branch.is_some() {
            SceneState::Branching
        } else {
            SceneState::Done { label: None }
        };
        self.scenes.insert(id.to_string(), next);
        self.start_ready(t);
    }

    /// Starts every scene that is neither started nor a branch target and whose `after` scenes are all done.
    fn start_ready(&mut self, t: &EventTemplate) {
        let done: BTreeSet<&str> = self
            .scenes
            .iter()
            .filter(|(_, s)| matches!(s, SceneState::Done { .. }))
            .map(|(id, _)| id.as_str())
            .collect();
        let ready: Vec<String> = t
            .scenes
            .iter()
            .filter(|s| !s.branch_target && !self.scenes.contains_key(&s.id))
            .filter(|s| s.after.iter().all(|a| done.contains(a.as_str())))
            .map(|s| s.id.clone())
            .collect();
        for id in ready {
            self.scenes.insert(
                id,
                SceneState::Asking {
                    slot: 0,
                    attempt: 1,
                },
            );
        }
    }
}

/// A slot's request with its texts rendered.
fn request(
    x: &SlotTemplate,
    text: &dyn Fn(&Template) -> Result<String, Missing>,
) -> Result<SlotRequest, Missing> {
    let work = match &x.work {
        SlotWork::Line {
            system,
            prompt,
            max_tokens,
        } => RenderedWork::Line {
            system: system.as_ref().map(text).transpose()?,
            prompt: text(prompt)?,
            max_tokens: *max_tokens,
        },
        SlotWork::Classify { classifier, input } => RenderedWork::Classify {
            classifier: classifier.clone(),
            input: text(input)?,
        },
    };
    Ok(SlotRequest {
        kind: x.kind,
        npc: x.npc.clone(),
        traits: x.traits.clone(),
        work,
        participants: x.participants.iter().map(text).collect::<Result<_, _>>()?,
        faction: x.faction.clone(),
    })
}

#[cfg(test)]
#[path = "walk_tests.rs"]
mod tests;
