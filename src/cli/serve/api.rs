//! The OpenAI-style request of `POST /v1/completions`, checked field by field, and the JSON
//! errors the server answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pipit_engine::sample::Sampling;
use pipit_engine::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};

/// The most choices one request may ask for.
const MAX_N: usize = 128;
/// The most stop strings a request may give (as OpenAI's API).
const MAX_STOPS: usize = 4;

/// An error as OpenAI's API gives it: a status, and `{"error": {"message", "type", "param",
/// "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
}

impl ApiError {
    /// 400: the request is wrong in `param`.
    pub fn invalid(message: &str, param: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.to_string(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_string()),
        }
    }

    /// 404 for a model this server does not serve.
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{asked}` does not exist; this server serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".into()),
        }
    }

    /// 404 for a path with no route.
    pub fn not_found(message: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.to_string(),
            kind: "invalid_request_error",
            param: None,
        }
    }

    /// 429: too many requests are waiting.
    pub fn busy() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "too many requests are waiting (--max-waiting); try again later".into(),
            kind: "rate_limit_error",
            param: None,
        }
    }

    /// 503: the server cannot serve.
    pub fn unavailable(message: &str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.to_string(),
            kind: "server_error",
            param: None,
        }
    }

    /// 500.
    pub fn internal(message: &str) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.to_string(),
            kind: "server_error",
            param: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": null,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A prompt as the API takes it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts, one choice set each.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Ids(Vec<u32>),
    /// Several prompts as token ids.
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Up to four.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The body of `POST /v1/completions`. Fields the server does not know are refused, naming
/// them, rather than silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// pipit's (and vLLM's) extension: draw among the k most likely (0 or -1: all).
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// pipit's (and vLLM's) extension: keep going past the end-of-text token.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Accepted and not used.
    #[serde(default, rename = "user")]
    pub _user: Option<String>,
}

impl CompletionRequest {
    /// Parse and check a request body; the error names the field.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        let req: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let text = inner.to_string();
            // An unknown field is named by serde in backquotes.
            let param = if inner.is_syntax() || inner.is_eof() {
                String::new()
            } else if text.starts_with("unknown field") {
                text.split('`').nth(1).unwrap_or("").to_string()
            } else if path == "." {
                String::new()
            } else {
                path
            };
            let message = if inner.is_syntax() || inner.is_eof() {
                format!("the body is not valid JSON: {text}")
            } else if param.is_empty() {
                format!("invalid request: {text}")
            } else {
                format!("invalid `{param}`: {text}")
            };
            ApiError::invalid(&message, &param)
        })?;
        if req.max_tokens == Some(0) {
            return Err(ApiError::invalid(
                "`max_tokens` must be at least 1, got 0",
                "max_tokens",
            ));
        }
        if let Some(n) = req.n {
            if n == 0 || n > MAX_N {
                return Err(ApiError::invalid(
                    &format!("`n` must be between 1 and {MAX_N}, got {n}"),
                    "n",
                ));
            }
        }
        if let Some(k) = req.top_k {
            if k < -1 {
                return Err(ApiError::invalid(
                    &format!("`top_k` must be -1, 0 (all tokens) or more, got {k}"),
                    "top_k",
                ));
            }
        }
        let stops = req.stop();
        if stops.len() > MAX_STOPS || stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                &format!("`stop` takes at most {MAX_STOPS} non-empty strings"),
                "stop",
            ));
        }
        Ok(req)
    }

    /// The stop strings.
    pub fn stop(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// Whether a streamed answer ends with the usage.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// How tokens are picked (OpenAI's defaults: temperature 1, top_p 1, all tokens).
    pub fn sampling(&self) -> Result<Sampling, ApiError> {
        let sampling = Sampling {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0).max(0) as usize,
            top_p: self.top_p.unwrap_or(1.0),
        };
        sampling.check(("`temperature`", "`top_p`")).map_err(|e| {
            let param = if e.to_string().contains("top_p") {
                "top_p"
            } else {
                "temperature"
            };
            ApiError::invalid(&e.to_string(), param)
        })?;
        Ok(sampling)
    }

    /// Each prompt's tokens (ids below `drawn`, at least one).
    pub fn prompts(&self, tokenizer: &Tokenizer, drawn: usize) -> Result<Vec<Vec<u32>>, ApiError> {
        let encode = |t: &str| {
            tokenizer
                .encode(t)
                .map_err(|e| ApiError::invalid(&format!("`prompt`: {e:#}"), "prompt"))
        };
        let lists = match &self.prompt {
            Prompt::Text(t) => vec![encode(t)?],
            Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
            Prompt::Ids(ids) => vec![ids.clone()],
            Prompt::IdLists(lists) => lists.clone(),
        };
        if lists.is_empty() {
            return Err(ApiError::invalid("`prompt` holds no prompt", "prompt"));
        }
        for ids in &lists {
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    "`prompt` must hold at least one token",
                    "prompt",
                ));
            }
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= drawn) {
                return Err(ApiError::invalid(
                    &format!("`prompt`: token {bad} is outside the vocabulary of {drawn}"),
                    "prompt",
                ));
            }
        }
        Ok(lists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(body: &str) -> Value {
        CompletionRequest::parse(body.as_bytes())
            .unwrap_err()
            .body()
    }

    #[test]
    fn errors_name_the_field() {
        let e = error(r#"{"model": "m", "prompt": "a", "max_tokenz": 3}"#);
        assert_eq!(e["error"]["param"], "max_tokenz");
        let e = error(r#"{"model": "m", "prompt": "a", "max_tokens": "three"}"#);
        assert_eq!(e["error"]["param"], "max_tokens");
        let e = error(r#"{"model": "m", "prompt": "a", "max_tokens": 0}"#);
        assert_eq!(e["error"]["param"], "max_tokens");
        let e = error(r#"{"model": "m", "prompt": "a", "n": 0}"#);
        assert_eq!(e["error"]["param"], "n");
        let e = error(r#"{"model": "m", "prompt": "a", "stop": ["", "x"]}"#);
        assert_eq!(e["error"]["param"], "stop");
        let e = error(r#"{"model": "m", "prompt": "a""#);
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"));
        let e = error(r#"{"model": "m"}"#);
        assert!(
            e["error"]["message"].as_str().unwrap().contains("prompt"),
            "{e}"
        );
    }

    #[test]
    fn prompts_come_as_text_or_ids() {
        let r = CompletionRequest::parse(br#"{"model": "m", "prompt": [[1, 2], [3]]}"#).unwrap();
        assert!(matches!(r.prompt, Prompt::IdLists(ref l) if l.len() == 2));
        let r = CompletionRequest::parse(br#"{"model": "m", "prompt": ["a", "b"], "stop": "x"}"#)
            .unwrap();
        assert!(matches!(r.prompt, Prompt::Texts(_)));
        assert_eq!(r.stop(), ["x"]);
        let s = r.sampling().unwrap();
        assert_eq!((s.temperature, s.top_k, s.top_p), (1.0, 0, 1.0));
    }
}
