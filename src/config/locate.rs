//! Where in the file something is: line numbers, the section a line belongs to, the line of a
//! key inside a section or a `[[...]]` entry. Every [`ConfigError`] that points at the file
//! is made here, so they all read the same: `file:line: [section] key `k`: message`.

use super::ConfigError;
use std::ops::Range;

/// The text a configuration came from, and its name for messages.
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    pub path: &'a str,
    pub text: &'a str,
}

impl<'a> Source<'a> {
    pub fn new(path: &'a str, text: &'a str) -> Self {
        Source { path, text }
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(self.text, offset);
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        (line, col)
    }

    fn lines(&self) -> impl Iterator<Item = (usize, &'a str)> {
        self.text.lines().enumerate().map(|(i, l)| (i + 1, l))
    }

    /// The header (`[gateway]`, `[[device]]`) of the section that line `line` belongs to, and
    /// the line the header is on.
    fn section_of(&self, line: usize) -> Option<(usize, &'a str)> {
        let mut found = None;
        for (n, l) in self.lines() {
            if n > line {
                break;
            }
            let t = l.trim();
            if t.starts_with('[') {
                found = Some((n, header_name(t)));
            }
        }
        found
    }

    /// How an entry is named in messages: `[gateway] `, `[[device]] "soil-1": `.
    fn entry_label(&self, header_line: usize, header: &str) -> String {
        if !header.starts_with("[[") {
            return format!("{header} ");
        }
        let id_key = if header == "[[stream]]" { "name" } else { "id" };
        let id = self
            .lines()
            .skip(header_line)
            .take_while(|(_, l)| !l.trim_start().starts_with('['))
            .find_map(|(_, l)| key_value(l).filter(|(k, _)| *k == id_key).map(|(_, v)| v));
        match id {
            Some(v) => format!("{header} {}: ", v.trim()),
            None => format!("{header} "),
        }
    }

    /// The line of `key = ...` in section `header` (e.g. `[metrics]`), or 0 when the key is
    /// not written there (a default value).
    pub fn key_in_section(&self, header: &str, key: &str) -> usize {
        let mut inside = header.is_empty();
        for (n, l) in self.lines() {
            let t = l.trim();
            if t.starts_with('[') {
                inside = header_name(t) == header;
                continue;
            }
            if inside && key_value(l).is_some_and(|(k, _)| k == key) {
                return n;
            }
        }
        0
    }

    /// The line of `key = ...` inside an entry whose span starts at `span.start` (up to the next
    /// table header), or the entry's first line.
    pub fn key_in_entry(&self, span: &Range<usize>, key: &str) -> usize {
        let (first, _) = self.line_col(span.start);
        for (n, l) in self.lines().skip(first - 1) {
            if n > first && l.trim_start().starts_with('[') {
                break;
            }
            if key_value(l).is_some_and(|(k, _)| k == key) {
                return n;
            }
        }
        first
    }

    /// An error about `key` of the entry at `span` (`[[device]]`, `[[stream]]`, ...).
    pub fn entry_error(
        &self,
        span: &Range<usize>,
        label: String,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.into(),
            line: self.key_in_entry(span, key),
            entry: label,
            key: key.into(),
            message: message.into(),
        }
    }

    /// An error about `key` of section `header` (`[gateway]`, ...).
    pub fn section_error(
        &self,
        header: &str,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.into(),
            line: self.key_in_section(header, key),
            entry: format!("{header} "),
            key: key.into(),
            message: message.into(),
        }
    }

    /// A parse error of the `toml` crate (syntax, types, unknown keys, and the values our
    /// deserializers refuse), placed at its line with its section and key when they can be
    /// told.
    pub fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return ConfigError::Syntax {
                path: self.path.into(),
                line: 0,
                column: 0,
                message,
            };
        };
        let (line, column) = self.line_col(span.start);
        let text = self.text.lines().nth(line - 1).unwrap_or("");
        // The key: from the message ("unknown field `x`", "missing field `x`"), else the
        // `key = ` on the line the value is on.
        let key = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| message.strip_prefix(p))
            .and_then(|r| r.split('`').next())
            .or_else(|| key_value(text).map(|(k, _)| k));
        match (key, self.section_of(line)) {
            (Some(key), Some((header_line, header))) => ConfigError::Invalid {
                path: self.path.into(),
                line,
                entry: self.entry_label(header_line, header),
                key: key.into(),
                message,
            },
            (Some(key), None) => ConfigError::Invalid {
                path: self.path.into(),
                line,
                entry: String::new(),
                key: key.into(),
                message,
            },
            _ => ConfigError::Syntax {
                path: self.path.into(),
                line,
                column,
                message,
            },
        }
    }
}

/// `[[device]]` from a header line like `[[device]]   # ABP`.
fn header_name(t: &str) -> &str {
    let end = if t.starts_with("[[") {
        t.find("]]").map(|i| i + 2)
    } else {
        t.find(']').map(|i| i + 1)
    };
    end.map_or(t, |e| &t[..e])
}

/// `(key, value text)` of a `key = value` line (quotes around the key removed).
fn key_value(line: &str) -> Option<(&str, &str)> {
    let t = line.trim_start();
    if t.starts_with('#') || t.starts_with('[') {
        return None;
    }
    let (k, v) = t.split_once('=')?;
    let k = k.trim().trim_matches('"');
    (!k.is_empty()).then_some((k, v.split('#').next().unwrap_or(v)))
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "[gateway]\nlisten = \"0.0.0.0:1700\"\n\n[metrics]\nlisten = \"x\"\n\n[[stream]]\nname = \"cloud\"\nserver = \"s\"\n";

    #[test]
    fn keys_are_found_in_their_own_section() {
        let s = Source::new("t.toml", SRC);
        assert_eq!(s.key_in_section("[gateway]", "listen"), 2);
        assert_eq!(s.key_in_section("[metrics]", "listen"), 5);
        assert_eq!(s.key_in_section("[storage]", "path"), 0);
        let span = SRC.find("[[stream]]").unwrap()..SRC.len();
        assert_eq!(s.key_in_entry(&span, "server"), 9);
        assert_eq!(s.entry_label(7, "[[stream]]"), "[[stream]] \"cloud\": ");
    }
}
