//! One e-mail from a batch of records: the subject from the `subject` template with the first
//! record as its context, the body as one part per record (the `body` template, or by default
//! an alert's sentence and facts / the record in the stream's format), in queue order.
//!
//! Pure: no I/O. The context of a template is the record's TTS JSON (an alert:
//! `{"alert": {"id", "kind", "state", "subject", "since", "message"}, "correlation_ids": [..],
//! "received_at": ..}`), so `{{ alert.kind }}` and `{{ end_device_ids.device_id }}` mean what
//! they mean on every other stream.

use super::template;
use serde_json::Value;

/// The longest subject sent (RFC 5322 §2.1.1 recommends lines of at most 78 characters; a
/// subject is folded by the mail builder, but a template must not make a page-long one).
const MAX_SUBJECT: usize = 200;

/// What one record contributes to an e-mail.
#[derive(Debug, Clone)]
pub struct Part {
    /// The record's TTS JSON, the templates' context.
    pub context: Value,
    /// The record in the stream's format (used for non-alert records without a `body`).
    pub formatted: Option<String>,
    pub correlation_id: String,
}

/// The subject and body of an e-mail of `parts` (at least one).
pub fn compose(subject: &str, body: Option<&str>, parts: &[Part]) -> (String, String) {
    let Some(first) = parts.first() else {
        return (String::new(), String::new());
    };
    let mut s = one_line(&template::render(subject, &first.context));
    if s.chars().count() > MAX_SUBJECT {
        s = s.chars().take(MAX_SUBJECT - 1).collect::<String>() + "…";
    }
    if parts.len() > 1 {
        s.push_str(&format!(" (+{} more)", parts.len() - 1));
    }
    if s.trim().is_empty() {
        s = "lorastream".into();
    }
    let mut text = String::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            text.push_str("\n\n----------------------------------------\n\n");
        }
        let part = match body {
            Some(t) => template::render(t, &p.context),
            None => default_part(p),
        };
        text.push_str(part.trim_end());
        text.push_str(&format!("\n\ncorrelation id: {}", p.correlation_id));
    }
    text.push('\n');
    (s, text)
}

/// Without a `body` template: an alert's sentence and its facts, one per line; any other
/// record as the stream's format made it (TTS JSON by default).
fn default_part(p: &Part) -> String {
    let a = &p.context["alert"];
    if a.is_object() {
        let field = |k: &str| a[k].as_str().unwrap_or("").to_string();
        return format!(
            "{}\n\nkind:     {}\nstate:    {}\nsubject:  {}\nsince:    {}\nalert id: {}\nat:       {}",
            field("message"),
            field("kind"),
            field("state"),
            field("subject"),
            field("since"),
            field("id"),
            p.context["received_at"].as_str().unwrap_or(""),
        );
    }
    match &p.formatted {
        Some(f) => match serde_json::from_str::<Value>(f) {
            // JSON is easier to read indented.
            Ok(v) if v.is_object() => {
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| f.clone())
            }
            _ => f.clone(),
        },
        None => p.context.to_string(),
    }
}

/// A header value on one line: line breaks and other control characters become spaces (a
/// template value must not add header lines).
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// A Message-ID for the e-mail of these records (RFC 5322 §3.6.4): the same records give the
/// same id, so that a copy sent again after a lost reply can be recognised by mail clients.
pub fn message_id(parts: &[Part], domain: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .collect()
    };
    let first = parts
        .first()
        .map(|p| p.correlation_id.as_str())
        .unwrap_or("");
    let last = parts
        .last()
        .map(|p| p.correlation_id.as_str())
        .unwrap_or("");
    let id = if parts.len() > 1 {
        format!("{}.{}.{}", clean(first), parts.len(), clean(last))
    } else {
        clean(first)
    };
    let domain = clean(domain);
    let domain = domain.trim_matches('.');
    format!(
        "<{}@{}>",
        id.trim_matches('.'),
        if domain.is_empty() {
            "lorastream"
        } else {
            domain
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alert(kind: &str, subject: &str) -> Part {
        Part {
            context: json!({"alert": {"id": "A1", "kind": kind, "state": "firing", "subject": subject,
                "since": "2026-01-01T00:00:00Z", "message": format!("{subject} is {kind}.")},
                "correlation_ids": ["lorastream:alert:01J"], "received_at": "2026-01-01T00:00:01Z"}),
            formatted: None,
            correlation_id: "lorastream:alert:01J".into(),
        }
    }

    #[test]
    fn subject_from_the_first_record_body_one_part_each() {
        let parts = [
            alert("device_silent", "soil-1"),
            alert("battery_low", "soil-2"),
        ];
        let (s, b) = compose("{{ alert.kind }} on {{ alert.subject }}", None, &parts);
        assert_eq!(s, "device_silent on soil-1 (+1 more)");
        assert!(
            b.starts_with("soil-1 is device_silent.\n\nkind:     device_silent\n"),
            "{b}"
        );
        assert!(b.contains("soil-2 is battery_low."), "{b}");
        assert_eq!(b.matches("correlation id: lorastream:alert:01J").count(), 2);
        let (_, b) = compose(
            "x",
            Some("{{ alert.subject }}: {{ alert.state }}"),
            &parts[..1],
        );
        assert_eq!(
            b,
            "soil-1: firing\n\ncorrelation id: lorastream:alert:01J\n"
        );
    }

    #[test]
    fn a_template_value_cannot_add_header_lines() {
        let mut p = alert("k", "evil\r\nBcc: x@example.com");
        p.correlation_id = "lorastream:up:01J:x".into();
        let (s, _) = compose("{{ alert.subject }}", None, &[p.clone()]);
        assert!(!s.contains('\n') && !s.contains('\r'), "{s:?}");
        assert_eq!(
            message_id(&[p], "gw-1.example"),
            "<lorastreamup01Jx@gw-1.example>"
        );
    }

    #[test]
    fn uplinks_default_to_their_formatted_body() {
        let p = Part {
            context: json!({"end_device_ids": {"device_id": "d1"}}),
            formatted: Some("{\"end_device_ids\":{\"device_id\":\"d1\"}}".into()),
            correlation_id: "c".into(),
        };
        let (s, b) = compose("up from {{ end_device_ids.device_id }}", None, &[p]);
        assert_eq!(s, "up from d1");
        assert!(b.contains("\"device_id\": \"d1\""), "{b}");
    }
}
