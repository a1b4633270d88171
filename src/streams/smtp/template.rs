//! Subject and body templates of the e-mail stream: `{{ a.b.c }}` is replaced by the value at
//! that path of the message's JSON (an alert: `{{ alert.kind }}`, `{{ alert.subject }}`,
//! `{{ alert.message }}`; an uplink: `{{ end_device_ids.device_id }}`,
//! `{{ uplink_message.f_cnt }}`). A path that leads nowhere renders as nothing; strings render
//! without quotes, other values as JSON.
//!
//! This is the placeholder subset of the Jinja-style `template` format, behind [`check`] and
//! [`render`] only, so that the full template engine (`streams::format::template`, being
//! merged from the `formats` branch) can take its place without touching the stream.

use serde_json::Value;

/// Why a template cannot be used (for `lorastream check`).
pub fn check(t: &str) -> Result<(), String> {
    let mut rest = t;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            return Err(format!("{t:?}: a \"{{{{\" is not closed with \"}}}}\""));
        };
        let path = after[..j].trim();
        if path.is_empty()
            || !path
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
        {
            return Err(format!(
                "{t:?}: {{{{ {path} }}}} is not a path like {{{{ alert.kind }}}} (only placeholders are supported here)"
            ));
        }
        rest = &after[j + 2..];
    }
    Ok(())
}

/// `t` with every placeholder replaced from `ctx` (a checked template; an unchecked one renders
/// what it can and keeps the rest as written).
pub fn render(t: &str, ctx: &Value) -> String {
    let mut out = String::with_capacity(t.len() + 64);
    let mut rest = t;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            out.push_str(&rest[i..]);
            return out;
        };
        let mut v = Some(ctx);
        for p in after[..j].trim().split('.') {
            v = v.and_then(|v| v.get(p));
        }
        match v {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {}
            Some(other) => out.push_str(&other.to_string()),
        }
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        let ctx =
            serde_json::json!({"alert": {"kind": "battery_low", "subject": "soil-1", "n": 3}});
        let t = "{{ alert.kind }} on {{alert.subject}} ({{ alert.n }}){{ alert.none }}";
        assert!(check(t).is_ok());
        assert_eq!(render(t, &ctx), "battery_low on soil-1 (3)");
        assert!(check("{{ alert.kind ").is_err());
        assert!(check("{{ alert.kind | upper }}").is_err());
        assert!(check("{{ }}").is_err());
        assert_eq!(render("plain", &ctx), "plain");
    }
}
