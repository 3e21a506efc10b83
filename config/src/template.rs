//! Text templates of event slots: literal text with `{name}` placeholders for the values an event is opened
//! with and `{slot.ID}` for the line an earlier slot of the same event produced; `{{` and `}}` are literal
//! braces. Parsed once when the event file loads, rendered by the director for every request.

use std::collections::BTreeMap;
use std::fmt;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// `{name}`: a value of the event.
    Value(String),
    /// `{slot.ID}`: the accepted line of slot `ID`.
    Slot(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// Why a template cannot be rendered: a value or a slot's line it needs is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Value(String),
    Slot(String),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Value(v) => write!(f, "no value for `{{{v}}}`"),
            Missing::Slot(s) => write!(f, "slot `{s}` has no line yet"),
        }
    }
}

impl Template {
    /// Parses `text`; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` at byte {at} (write `}}}}` for a brace)"
                    ));
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, ch)) if ch.is_ascii_alphanumeric() || "-_.".contains(ch) => {
                                name.push(ch)
                            }
                            _ => {
                                return Err(format!(
                                    "placeholder at byte {at} must be `{{name}}` or `{{slot.ID}}` \
                                     (letters, digits, `-`, `_`), closed by `}}`"
                                ));
                            }
                        }
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut lit)));
                    }
                    pieces.push(match name.split_once('.') {
                        Some(("slot", id)) if !id.is_empty() && !id.contains('.') => {
                            Piece::Slot(id.to_string())
                        }
                        None if !name.is_empty() => Piece::Value(name),
                        _ => return Err(format!("`{{{name}}}` at byte {at} is not a placeholder")),
                    });
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Text(lit));
        }
        Ok(Self { pieces })
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The values it names.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Value(v) => Some(v.as_str()),
            _ => None,
        })
    }

    /// The slots whose lines it quotes.
    pub fn slots(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Slot(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// Fills the placeholders.
    pub fn render(
        &self,
        values: &BTreeMap<String, String>,
        lines: &BTreeMap<String, String>,
    ) -> Result<String, Missing> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Value(v) => out.push_str(values.get(v).ok_or(Missing::Value(v.clone()))?),
                Piece::Slot(s) => out.push_str(lines.get(s).ok_or(Missing::Slot(s.clone()))?),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn values_slots_and_escaped_braces_render() {
        let t = Template::parse("{{{ship}}} docks; {npc-name} said: {slot.hail}").unwrap();
        assert_eq!(t.values().collect::<Vec<_>>(), ["ship", "npc-name"]);
        assert_eq!(t.slots().collect::<Vec<_>>(), ["hail"]);
        let out = t
            .render(
                &map(&[("ship", "Gull"), ("npc-name", "Odile")]),
                &map(&[("hail", "Ahoy!")]),
            )
            .unwrap();
        assert_eq!(out, "{Gull} docks; Odile said: Ahoy!");
        assert_eq!(
            t.render(&map(&[("ship", "Gull")]), &BTreeMap::new()),
            Err(Missing::Value("npc-name".into()))
        );
    }

    #[test]
    fn malformed_placeholders_are_refused_with_their_place() {
        for bad in [
            "a {b",
            "a } b",
            "{}",
            "{slot.}",
            "{x.y}",
            "{a b}",
            "{slot.a.b}",
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.contains("byte"), "{bad}: {e}");
        }
    }
}
