//! `response_format` as OpenAI clients send it (on chat completions and `/v1/dialog`): `text` (no
//! constraint), `json_object` (any JSON object) or `json_schema` (`{"json_schema": {"name", "schema",
//! "strict"}}`), parsed into the tiers' [`ResponseFormat`]. Whether a schema compiles is the tier's to say
//! (admission asks it before a slot is taken).

use nimmer_tiers::ResponseFormat;
use serde::Deserialize;

use crate::error::ApiError;

/// The request field.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormatInput {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaInput },
}

/// OpenAI's `json_schema` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaInput {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// Accepted either way: the schema is always enforced.
    #[serde(default)]
    pub strict: Option<bool>,
}

impl ResponseFormatInput {
    /// The constraint to decode under (`None` for `text`).
    pub fn parse(&self) -> Result<Option<ResponseFormat>, ApiError> {
        Ok(match self {
            Self::Text => None,
            Self::JsonObject => Some(ResponseFormat::JsonObject),
            Self::JsonSchema { json_schema } => match &json_schema.schema {
                Some(schema @ (serde_json::Value::Object(_) | serde_json::Value::Bool(true))) => {
                    Some(ResponseFormat::JsonSchema {
                        schema: schema.clone(),
                    })
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        "must be a JSON Schema object",
                    ));
                }
                None => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        "give the schema the answer must follow",
                    ));
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<Option<ResponseFormat>, String> {
        serde_json::from_value::<ResponseFormatInput>(v)
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_three_openai_shapes_parse() {
        assert_eq!(parse(serde_json::json!({"type": "text"})), Ok(None));
        assert_eq!(
            parse(serde_json::json!({"type": "json_object"})),
            Ok(Some(ResponseFormat::JsonObject))
        );
        let schema =
            serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            parse(
                serde_json::json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}})
            ),
            Ok(Some(ResponseFormat::JsonSchema { schema }))
        );
        assert!(
            parse(serde_json::json!({"type": "json_schema", "json_schema": {"name": "x"}}))
                .is_err()
        );
        assert!(
            parse(serde_json::json!({"type": "json_schema", "json_schema": {"schema": 3}}))
                .is_err()
        );
        assert!(parse(serde_json::json!({"type": "yaml"})).is_err());
    }
}
