//! RFC 5424 messages as this sink writes them: the header (PRI from the stream and the event's
//! kind, the record's own timestamp, `[sparbar@32473 id=".." seq=".."]`), the record as MSG, and
//! RFC 6587 octet counting around each.

use std::{
    borrow::Cow,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

use crate::ship::{Line, Stream};

/// The SD-ID of the structured-data element. 32473 is the private enterprise number RFC 5612
/// reserves for documentation; a registered number would replace it (receivers match on it).
pub const SD_ID: &str = "sparbar@32473";

/// The fixed part of every message.
pub(super) struct Header {
    pub(super) facility: u8,
    pub(super) host: String,
    pub(super) app: String,
    pub(super) procid: String,
}

/// The fields of a record the header needs (the rest of the record is skipped unparsed).
#[derive(Deserialize, Default)]
struct RecordHead<'a> {
    #[serde(rename = "@timestamp", borrow, default)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<EventHead<'a>>,
}

#[derive(Deserialize, Default)]
struct EventHead<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    sequence: Option<u64>,
}

impl Header {
    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [sparbar@32473 id=".." seq=".."] MSG`.
    /// MSG is the record as spooled, without the UTF-8 BOM RFC 5424 asks of MSG-UTF8: it is then
    /// MSG-ANY, which every receiver takes as is, and the record stays byte-exact (its hash
    /// chain covers those bytes).
    pub(super) fn message(&self, line: &Line) -> Vec<u8> {
        let head: RecordHead = serde_json::from_slice(&line.bytes).unwrap_or_default();
        let event = head.event.unwrap_or_default();
        let pri =
            u16::from(self.facility) * 8 + u16::from(severity(line.stream, event.kind.as_deref()));
        let ts = head
            .timestamp
            .as_deref()
            .and_then(rfc5424_timestamp)
            .unwrap_or_else(|| Cow::Owned(now_timestamp()));
        let mut sd = format!("[{SD_ID}");
        if let Some(id) = &event.id {
            sd.push_str(" id=\"");
            sd_escape_into(&mut sd, id);
            sd.push('"');
        }
        sd.push_str(&format!(" seq=\"{}\"]", event.sequence.unwrap_or(line.seq)));
        let mut m = format!(
            "<{pri}>1 {ts} {} {} {} {} {sd} ",
            self.host,
            self.app,
            self.procid,
            line.stream.name()
        )
        .into_bytes();
        m.extend_from_slice(&line.bytes);
        m
    }
}

/// 4 (warning) for alerts, 5 (notice) for the rest of the security stream, 6 (info) for access.
pub fn severity(stream: Stream, event_kind: Option<&str>) -> u8 {
    match (event_kind, stream) {
        (Some("alert"), _) => 4,
        (_, Stream::Security) => 5,
        (_, Stream::Access) => 6,
    }
}

/// Escapes a PARAM-VALUE (RFC 5424 §6.3.3): `"`, `\` and `]` get a backslash.
pub fn sd_escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    sd_escape_into(&mut s, v);
    s
}

fn sd_escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A header field as RFC 5424 allows it: 1 to `max` printable US-ASCII characters, `-` if
/// nothing is left.
pub(super) fn header_field(v: &str, max: usize) -> String {
    let s: String = v
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// An RFC 3339 timestamp as RFC 5424's TIMESTAMP: upper-case `T` and `Z`, at most 6 fractional
/// digits (more are cut, not rounded). `None` when it is not a valid timestamp.
pub fn rfc5424_timestamp(s: &str) -> Option<Cow<'_, str>> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
    };
    let (mo, d, h, mi, sec) = (
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    num(0..4)?;
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let mut i = 19;
    let mut frac_end = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        frac_end = start + (i - start).min(6);
    }
    let zone = &s[i..];
    let zb = zone.as_bytes();
    let zone_ok = matches!(zone, "Z" | "z")
        || (zb.len() == 6
            && matches!(zb[0], b'+' | b'-')
            && zb[3] == b':'
            && num(i + 1..i + 3).is_some_and(|h| h <= 23)
            && num(i + 4..i + 6).is_some_and(|m| m <= 59));
    if !zone_ok {
        return None;
    }
    if b[10] == b'T' && zone != "z" && frac_end == i {
        return Some(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    out.push_str(&s[..10]);
    out.push('T');
    out.push_str(&s[11..frac_end]);
    out.push_str(if zone == "z" { "Z" } else { zone });
    Some(Cow::Owned(out))
}

pub(super) fn now_timestamp() -> String {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    crate::record::rfc3339_micros(ns)
}

/// RFC 6587 octet counting (also RFC 5425's framing): `MSG-LEN SP SYSLOG-MSG`.
pub fn octet_frame(out: &mut Vec<u8>, msg: &[u8]) {
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::ship::syslog) fn line(stream: Stream, seq: u64, json: &str) -> Line {
        Line {
            stream,
            seq,
            bytes: json.as_bytes().to_vec(),
        }
    }

    pub(in crate::ship::syslog) fn header() -> Header {
        Header {
            facility: 13,
            host: "web-1".into(),
            app: "sparbar".into(),
            procid: "42".into(),
        }
    }

    #[test]
    fn message_layout() {
        let l = line(
            Stream::Security,
            9,
            r#"{"event":{"sequence":7,"id":"a\"b]c\\d","kind":"alert"},"@timestamp":"2024-05-01T10:00:00.123456789+02:00","x":"é"}"#,
        );
        let m = String::from_utf8(header().message(&l)).unwrap();
        assert_eq!(
            m,
            r#"<108>1 2024-05-01T10:00:00.123456+02:00 web-1 sparbar 42 security [sparbar@32473 id="a\"b\]c\\d" seq="7"] {"event":{"sequence":7,"id":"a\"b]c\\d","kind":"alert"},"@timestamp":"2024-05-01T10:00:00.123456789+02:00","x":"é"}"#
        );
    }

    #[test]
    fn pri_per_stream_and_kind() {
        let h = header();
        let pri = |l: &Line| {
            let m = h.message(l);
            let end = m.iter().position(|&c| c == b'>').unwrap();
            String::from_utf8(m[1..end].to_vec()).unwrap()
        };
        assert_eq!(
            pri(&line(Stream::Access, 1, r#"{"event":{"kind":"event"}}"#)),
            "110"
        );
        assert_eq!(
            pri(&line(Stream::Security, 1, r#"{"event":{"kind":"event"}}"#)),
            "109"
        );
        assert_eq!(
            pri(&line(Stream::Security, 1, r#"{"event":{"kind":"alert"}}"#)),
            "108"
        );
        assert_eq!(
            pri(&line(Stream::Access, 1, r#"{"event":{"kind":"alert"}}"#)),
            "108"
        );
        let mut h0 = header();
        h0.facility = 0;
        assert_eq!(h0.message(&line(Stream::Access, 1, "{}"))[..3], *b"<6>");
        assert_eq!(severity(Stream::Security, None), 5);
    }

    #[test]
    fn missing_or_odd_fields_still_make_a_message() {
        let h = header();
        // Not JSON at all, a number where a string was expected: now, and the spool's sequence.
        for bad in [
            "not json",
            r#"{"event":{"id":5}}"#,
            r#"{"@timestamp":"yesterday"}"#,
        ] {
            let m = String::from_utf8(h.message(&line(Stream::Access, 77, bad))).unwrap();
            let parts: Vec<&str> = m.splitn(8, ' ').collect();
            assert_eq!(parts[0], "<110>1");
            assert!(rfc5424_timestamp(parts[1]).is_some(), "{m}");
            assert_eq!(parts[6], r#"[sparbar@32473"#);
            assert!(m.contains(r#" seq="77"] "#), "{m}");
            assert!(m.ends_with(bad));
        }
    }

    #[test]
    fn sd_escaping() {
        assert_eq!(sd_escape(r#"plain-id"#), "plain-id");
        assert_eq!(sd_escape(r#"a"b"#), r#"a\"b"#);
        assert_eq!(sd_escape(r#"a\b"#), r#"a\\b"#);
        assert_eq!(sd_escape(r#"a]b"#), r#"a\]b"#);
        assert_eq!(sd_escape(r#"[x="y"]\"#), r#"[x=\"y\"\]\\"#);
        assert_eq!(sd_escape("ünïcode"), "ünïcode");
    }

    #[test]
    fn timestamps() {
        let ok =
            |s: &str, want: &str| assert_eq!(rfc5424_timestamp(s).as_deref(), Some(want), "{s}");
        ok("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z");
        ok("2024-05-01T10:00:00.1Z", "2024-05-01T10:00:00.1Z");
        ok("2024-05-01T10:00:00.123456Z", "2024-05-01T10:00:00.123456Z");
        ok(
            "2024-05-01T10:00:00.123456789Z",
            "2024-05-01T10:00:00.123456Z",
        );
        ok("2024-05-01t10:00:00z", "2024-05-01T10:00:00Z");
        ok("2024-05-01T10:00:00-05:30", "2024-05-01T10:00:00-05:30");
        assert!(matches!(
            rfc5424_timestamp("2024-05-01T10:00:00Z"),
            Some(Cow::Borrowed(_))
        ));
        for bad in [
            "",
            "2024-05-01",
            "2024-05-01 10:00:00Z",
            "2024-13-01T10:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T10:00:60Z",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00",
            "2024-05-01T10:00:00+0200",
            "2024-05-01T10:00:00Zjunk",
            "2024-05-01T10:00:00+25:00",
            "2024-05-01T10:00:00\u{e9}",
            "\u{e9}024-05-01T10:00:00Z",
        ] {
            assert_eq!(rfc5424_timestamp(bad), None, "{bad:?}");
        }
        assert!(rfc5424_timestamp(&now_timestamp()).is_some());
    }

    #[test]
    fn octet_counting() {
        let mut out = Vec::new();
        octet_frame(&mut out, "<110>1 - - - - - - é".as_bytes());
        octet_frame(&mut out, b"x");
        assert_eq!(out, "21 <110>1 - - - - - - é1 x".as_bytes());
    }

    #[test]
    fn header_fields() {
        assert_eq!(header_field("web 1\u{e9}.example", 255), "web1.example");
        assert_eq!(header_field("", 255), "-");
        assert_eq!(header_field(&"a".repeat(300), 255).len(), 255);
    }
}
