//! The TTS JSON of a record as an XML document (`format = "xml"`).
//!
//! Role: give XML consumers the same content as the `tts` format. The document is made from the
//! record's TTS JSON text (the output of `record_json`), streamed straight into quick-xml's
//! writer, so it always carries exactly what the JSON carries, in the JSON's order.
//!
//! Layout (deterministic, documented in docs/formats.md):
//! - `<?xml version="1.0" encoding="UTF-8"?>`, then one root element named after TTS's message
//!   type: `application_up` for device uplinks and joins (TTS `ApplicationUp`, whose JSON has
//!   the `uplink_message` / `join_accept` child), `gateway_up` for raw gateway frames. The root
//!   declares `xmlns:xsi` (used by `xsi:nil`).
//! - A JSON object member `"k": v` becomes an element `<k>` holding `v`; members keep the JSON
//!   order. Keys that are not plain XML names (`[A-Za-z_][A-Za-z0-9_.-]*`, not starting with
//!   `xml` in any case — e.g. CayenneLPP's `"1"` or a codec's `"a b"`) become
//!   `<field name="k">`.
//! - An array member `"k": [a, b]` becomes repeated `<k>a</k><k>b</k>`; an empty array writes
//!   nothing. An array inside an array becomes one `<k>` whose items are `<item>` elements.
//! - Scalars are text: strings as they are, numbers as the JSON wrote them, `true`/`false`;
//!   `null` is `<k xsi:nil="true"/>`; an empty string or object is `<k/>`.
//!
//! Escaping: `&`, `<`, `>` in text; also `"`, `'`, TAB, LF, CR in attributes; CR in text as
//! `&#13;` so that parsers' end-of-line normalisation cannot turn it into LF, and LF as `&#10;`
//! so that a document is always one line (`file` and `stdout` streams write one per line). A string holding a
//! character XML 1.0 cannot carry at all (U+0000–U+001F other than TAB/LF/CR, U+FFFE, U+FFFF;
//! not even as a character reference) is written base64 (standard, padded) of its UTF-8 with
//! `encoding="base64"` on the element — lossless rather than silently altered; a key holding
//! one is written the same way in `name` with `name_encoding="base64"`.
//!
//! Guarantees: the output is well-formed XML 1.0 for any JSON input (nesting is bounded by
//! serde_json's recursion limit of 128); no panics; invalid input is an [`XmlError`].

use crate::model::Record;
use base64::Engine;
use quick_xml::events::attributes::Attribute;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::name::QName;
use quick_xml::Writer;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

/// `Content-Type` of the documents (HTTP streams, IoT Hub `$.ct`).
pub const CONTENT_TYPE: &str = "application/xml";

/// The XML declaration every document starts with.
pub const DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// Root element of device uplinks, joins and downlink events (TTS `ApplicationUp`).
pub const APPLICATION_UP: &str = "application_up";

/// Root element of raw gateway frames.
pub const GATEWAY_UP: &str = "gateway_up";

/// Root element of an operator alert.
pub const ALERT: &str = "alert_message";

/// The XML Schema instance namespace, for `xsi:nil`.
const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// Why no document was made.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("the input is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// quick-xml refused to write (cannot happen with a `Vec` sink; typed all the same).
    #[error("cannot write the document: {0}")]
    Write(#[from] std::io::Error),
    #[error("the input JSON is not an object")]
    NotAnObject,
    #[error("{0:?} is not usable as the root element name")]
    RootName(String),
}

/// The root element for a record (see the module docs).
pub fn root_element(r: &Record) -> &'static str {
    match r {
        Record::Uplink(_) | Record::Join(_) => APPLICATION_UP,
        Record::GatewayFrame(_) => GATEWAY_UP,
        Record::Alert(_) => ALERT,
    }
}

/// The XML document of a record, from its TTS JSON (`record_json(r, d)`).
pub fn record_xml(r: &Record, tts_json: &[u8]) -> Result<Vec<u8>, XmlError> {
    json_to_xml(root_element(r), tts_json)
}

/// The XML document of a JSON object under root element `root` (see the module docs).
pub fn json_to_xml(root: &str, json: &[u8]) -> Result<Vec<u8>, XmlError> {
    if !is_plain_name(root) {
        return Err(XmlError::RootName(root.to_string()));
    }
    let mut w = Writer::new(Vec::with_capacity(json.len() * 2));
    // Writing into a Vec cannot fail; the results are still checked rather than unwrapped.
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    // The root must be an object: look at the first token before streaming anything.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<de::IgnoredAny>(json) {
            Ok(_) => XmlError::NotAnObject,
            Err(e) => XmlError::Json(e),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    RootSeed { w: &mut w, root }
        .deserialize(&mut de)
        .map_err(XmlError::Json)?;
    de.end()?;
    Ok(w.into_inner())
}

/// `[A-Za-z_][A-Za-z0-9_.-]*`, not starting with `xml` (reserved by XML 1.0 §2.3). ASCII only:
/// a subset of XML names that every parser and XPath tool takes, with no namespace colon.
fn is_plain_name(s: &str) -> bool {
    let b = s.as_bytes();
    match b.first() {
        Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {}
        _ => return false,
    }
    if b.len() >= 3 && b[..3].eq_ignore_ascii_case(b"xml") {
        return false;
    }
    b.iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// Characters XML 1.0 (§2.2 `Char`) allows; Rust `char`s are never surrogates.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Text content, escaped; `None` if it holds a character XML cannot carry.
fn escape_text(s: &str) -> Option<Cow<'_, str>> {
    if !s.chars().all(is_xml_char) {
        return None;
    }
    if !s.contains(['&', '<', '>', '\r', '\n']) {
        return Some(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            // `]]>` is not allowed in text; escaping every `>` is the simple way out.
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            '\n' => out.push_str("&#10;"),
            c => out.push(c),
        }
    }
    Some(Cow::Owned(out))
}

/// An attribute value (always written in double quotes), escaped; whitespace other than the
/// space as character references, which attribute-value normalisation leaves alone. Callers
/// pass only XML-legal text.
fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

fn push_attr(start: &mut BytesStart<'_>, key: &'static str, raw_escaped: String) {
    start.push_attribute(Attribute {
        key: QName(key.as_bytes()),
        value: Cow::Owned(raw_escaped.into_bytes()),
    });
}

/// The start tag for a JSON key.
fn start_for(key: &str) -> BytesStart<'static> {
    if is_plain_name(key) {
        return BytesStart::new(key.to_string());
    }
    let mut s = BytesStart::new("field");
    if key.chars().all(is_xml_char) {
        push_attr(&mut s, "name", escape_attr(key));
    } else {
        push_attr(&mut s, "name", b64(key));
        push_attr(&mut s, "name_encoding", "base64".to_string());
    }
    s
}

type W = Writer<Vec<u8>>;

fn write<E: de::Error>(w: &mut W, ev: Event<'_>) -> Result<(), E> {
    w.write_event(ev).map_err(E::custom)
}

/// Writes a scalar element `<key>text</key>` (`text` unescaped).
fn scalar<E: de::Error>(w: &mut W, key: &str, text: &str) -> Result<(), E> {
    let mut start = start_for(key);
    if text.is_empty() {
        return write(w, Event::Empty(start));
    }
    let body = match escape_text(text) {
        Some(t) => t,
        None => {
            push_attr(&mut start, "encoding", "base64".to_string());
            Cow::Owned(b64(text))
        }
    };
    let end = start.to_end().into_owned();
    write(w, Event::Start(start))?;
    write(w, Event::Text(BytesText::from_escaped(body)))?;
    write(w, Event::End(end))
}

/// The root: must be an object.
struct RootSeed<'w, 'r> {
    w: &'w mut W,
    root: &'r str,
}

impl<'de> DeserializeSeed<'de> for RootSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RootSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let mut start = BytesStart::new(self.root.to_string());
        push_attr(&mut start, "xmlns:xsi", XSI.to_string());
        let end = BytesEnd::new(self.root.to_string());
        write(self.w, Event::Start(start))?;
        members(self.w, map)?;
        write(self.w, Event::End(end))
    }
}

/// Writes every member of an object as an element.
fn members<'de, A: MapAccess<'de>>(w: &mut W, mut map: A) -> Result<(), A::Error> {
    while let Some(key) = map.next_key::<Cow<'de, str>>()? {
        map.next_value_seed(Member { w, key: &key })?;
    }
    Ok(())
}

/// A member's value, written under `key`.
struct Member<'w, 'k> {
    w: &'w mut W,
    key: &'k str,
}

impl<'de> DeserializeSeed<'de> for Member<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Member<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        scalar(self.w, self.key, if v { "true" } else { "false" })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        scalar(self.w, self.key, &v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        scalar(self.w, self.key, &v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // serde_json's own formatting of the number (JSON never holds NaN/inf).
        let text = serde_json::Number::from_f64(v)
            .map(|n| n.to_string())
            .unwrap_or_default();
        scalar(self.w, self.key, &text)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        scalar(self.w, self.key, v)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        let mut start = start_for(self.key);
        push_attr(&mut start, "xsi:nil", "true".to_string());
        write(self.w, Event::Empty(start))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let start = start_for(self.key);
        let Some(first) = map.next_key::<Cow<'de, str>>()? else {
            return write(self.w, Event::Empty(start));
        };
        let end = start.to_end().into_owned();
        write(self.w, Event::Start(start))?;
        map.next_value_seed(Member {
            w: self.w,
            key: &first,
        })?;
        members(self.w, map)?;
        write(self.w, Event::End(end))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Item {
                w: self.w,
                key: self.key,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// One array item, written under the array's key; an array item is a wrapper of `<item>`s.
struct Item<'w, 'k> {
    w: &'w mut W,
    key: &'k str,
}

impl<'de> DeserializeSeed<'de> for Item<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Item<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        Member::from(self).visit_bool(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        Member::from(self).visit_i64(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        Member::from(self).visit_u64(v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        Member::from(self).visit_f64(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        Member::from(self).visit_str(v)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Member::from(self).visit_unit()
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        Member::from(self).visit_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        // A nested array: one element for it, its items inside as `<item>`.
        let start = start_for(self.key);
        let end = start.to_end().into_owned();
        write(self.w, Event::Start(start))?;
        Member {
            w: self.w,
            key: "item",
        }
        .visit_seq(seq)?;
        write(self.w, Event::End(end))
    }
}

impl<'w, 'k> From<Item<'w, 'k>> for Member<'w, 'k> {
    fn from(i: Item<'w, 'k>) -> Self {
        Member { w: i.w, key: i.key }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(json: &str) -> String {
        String::from_utf8(json_to_xml("application_up", json.as_bytes()).unwrap()).unwrap()
    }

    const HEAD: &str = r#"<?xml version="1.0" encoding="UTF-8"?><application_up xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#;

    #[test]
    fn layout() {
        let out = xml(
            r#"{"b":{"x":1,"y":[1,2]},"a":"s","e":[],"o":{},"n":null,"f":21.0,"s":"","t":true,"m":[[1,[2]],3]}"#,
        );
        assert_eq!(
            out,
            format!(
                "{HEAD}<b><x>1</x><y>1</y><y>2</y></b><a>s</a><o/><n xsi:nil=\"true\"/><f>21.0</f><s/><t>true</t>\
                 <m><item>1</item><item><item>2</item></item></m><m>3</m></application_up>"
            )
        );
    }

    #[test]
    fn odd_keys_and_text() {
        let out = xml(r#"{"1":"<&>\"'","a b":"x\r\ny","xmlns":1,"é":2}"#);
        assert_eq!(
            out,
            format!(
                "{HEAD}<field name=\"1\">&lt;&amp;&gt;\"'</field><field name=\"a b\">x&#13;&#10;y</field>\
                 <field name=\"xmlns\">1</field><field name=\"é\">2</field></application_up>"
            )
        );
    }

    #[test]
    fn unrepresentable_characters_go_base64() {
        let out = xml("{\"id\":\"a\\u0000b\",\"k\\u0001\":\"v\"}");
        assert!(out.contains(r#"<id encoding="base64">YQBi</id>"#), "{out}");
        assert!(
            out.contains(r#"<field name="awE=" name_encoding="base64">v</field>"#),
            "{out}"
        );
    }

    #[test]
    fn errors() {
        assert!(matches!(
            json_to_xml("r", b"[1]"),
            Err(XmlError::NotAnObject)
        ));
        assert!(matches!(
            json_to_xml("r", b"\"s\""),
            Err(XmlError::NotAnObject)
        ));
        assert!(matches!(json_to_xml("r", b"{"), Err(XmlError::Json(_))));
        assert!(matches!(json_to_xml("r", b"{} x"), Err(XmlError::Json(_))));
        assert!(matches!(json_to_xml("1bad", b"{}"), Err(XmlError::RootName(n)) if n == "1bad"));
        let deep = "[".repeat(200) + &"]".repeat(200);
        let deep = format!("{{\"a\":{deep}}}");
        assert!(matches!(
            json_to_xml("r", deep.as_bytes()),
            Err(XmlError::Json(_))
        ));
    }
}
