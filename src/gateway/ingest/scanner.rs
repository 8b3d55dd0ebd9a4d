//! The validate-only scanner: the common shape of a `results` message (an
//! array of objects whose values are strings without escapes, integers,
//! `true`/`false`/`null` and objects) read byte by byte, without serde. It
//! gives up (`None`) on anything else: other elements, escapes, fractions,
//! exponents, integers serde_json would read as floats, arrays, deep nesting
//! and every syntax error, all of which the serde reader then handles. What it
//! accepts is valid JSON, read as serde_json reads it.

use std::borrow::Cow;

use serde_json::Number;

use super::serde_reader::{stage_raw, RawMeta, RawUpdate, Scalar};
use super::{ParsedResults, UpdatePolicy, STRONG_ID_KEYS};

/// Deepest object nesting the scanner follows (the array is level 0, updates
/// level 1); far below serde_json's recursion limit.
const SCAN_MAX_DEPTH: usize = 8;

pub(super) fn scan_validate_only(text: &str, policy: &UpdatePolicy) -> Option<ParsedResults> {
    let mut scanner = Scanner { text, pos: 0 };
    let mut out = ParsedResults::default();
    scanner.ws();
    scanner.eat(b'[')?;
    scanner.ws();
    if scanner.peek() == Some(b']') {
        scanner.pos += 1;
    } else {
        loop {
            let update = scanner.update()?;
            stage_raw(&mut out, update, policy, false);
            scanner.ws();
            match scanner.next()? {
                b',' => scanner.ws(),
                b']' => break,
                _ => return None,
            }
        }
    }
    scanner.ws();
    (scanner.pos == text.len()).then_some(out)
}

struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.pos;
        let end = string_end(self.text.as_bytes(), start);
        if self.text.as_bytes().get(end) != Some(&b'"') {
            return None;
        }
        self.pos = end + 1;
        // Both ends are next to an ASCII quote, so on character boundaries.
        self.text.get(start..end)
    }

    /// An integer serde_json reads as an integer (not `-0`, not out of the
    /// `u64`/`i64` range, no fraction or exponent), as `Value` stores it.
    fn integer(&mut self) -> Option<Number> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        let digits = self.text.get(start..self.pos)?;
        if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return None;
        }
        let magnitude: u64 = digits.parse().ok()?;
        if !negative {
            return Some(magnitude.into());
        }
        if magnitude == 0 {
            return None;
        }
        0i64.checked_sub_unsigned(magnitude).map(Number::from)
    }

    /// `true`, `false` or `null`.
    fn literal(&mut self) -> Option<()> {
        let rest = self.text.as_bytes().get(self.pos..)?;
        let len = [&b"true"[..], b"false", b"null"]
            .into_iter()
            .find(|word| rest.starts_with(word))?
            .len();
        self.pos += len;
        Some(())
    }

    /// The members of an object, each value read by `member` (which must
    /// consume it); `depth` is the object's own.
    fn object(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        if depth > SCAN_MAX_DEPTH {
            return None;
        }
        self.eat(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// Any value the scanner accepts, dropped.
    fn skip(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(depth, |s, _| s.skip(depth + 1)),
            b'-' | b'0'..=b'9' => self.integer().map(drop),
            _ => self.literal(),
        }
    }

    /// A value as `Scalar` classifies it.
    fn scalar(&mut self, depth: usize) -> Option<Scalar<'a>> {
        match self.peek()? {
            b'"' => self.string().map(|s| Scalar::Str(Cow::Borrowed(s))),
            b'-' | b'0'..=b'9' => self.integer().map(Scalar::Num),
            _ => self.skip(depth).map(|()| Scalar::Other),
        }
    }

    /// One element of the array; `None` also for elements that are not
    /// objects (the serde reader counts those).
    fn update(&mut self) -> Option<RawUpdate<'a>> {
        let mut update = RawUpdate::default();
        self.object(1, |s, key| {
            match key {
                "partition" => update.partition = s.scalar(2)?.into_text(),
                "ip" => update.ip = s.scalar(2)?.into_text(),
                "source" => update.source = s.scalar(2)?.into_text(),
                "mac" => update.mac = s.scalar(2)?.into_text(),
                "hostname" => update.hostname = s.scalar(2)?.into_text(),
                "sync_meta" => update.sync_meta = s.sync_meta()?,
                "metadata" => update.has_strong_id = s.strong_id_probe()?,
                _ => s.skip(2)?,
            }
            Some(())
        })?;
        Some(update)
    }

    /// `SyncMetaField`.
    fn sync_meta(&mut self) -> Option<Option<RawMeta<'a>>> {
        if self.peek()? != b'{' {
            return self.skip(2).map(|()| None);
        }
        let mut meta = RawMeta::default();
        self.object(2, |s, key| {
            let field = match key {
                "sync_run_id" => &mut meta.sync_run_id,
                "chunk_index" => &mut meta.chunk_index,
                "total_chunks" => &mut meta.total_chunks,
                "total_devices" => &mut meta.total_devices,
                "sync_service_id" => &mut meta.sync_service_id,
                _ => return s.skip(3),
            };
            *field = s.scalar(3)?;
            Some(())
        })?;
        Some(Some(meta))
    }

    /// `StrongIdProbe`.
    fn strong_id_probe(&mut self) -> Option<bool> {
        if self.peek()? != b'{' {
            return self.skip(2).map(|()| false);
        }
        let mut usable = [false; STRONG_ID_KEYS.len()];
        self.object(2, |s, key| {
            match STRONG_ID_KEYS.iter().position(|k| *k == key) {
                Some(i) => usable[i] = s.scalar(3)?.is_strong_id(),
                None => s.skip(3)?,
            }
            Some(())
        })?;
        Some(usable.contains(&true))
    }
}

/// The index of the first `"`, `\` or control character at or after
/// `start` (`bytes.len()` when there is none), eight bytes at a time.
fn string_end(bytes: &[u8], start: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_ne_bytes([b'"'; 8]);
    const BACKSLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
    const SPACES: u64 = u64::from_ne_bytes([0x20; 8]);
    let mut pos = start;
    while let Some(chunk) = bytes.get(pos..pos + 8) {
        let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        // Little-endian, so that the lowest flagged byte comes first: only
        // bytes after a match can be flagged wrongly (borrows).
        let word = u64::from_le_bytes(chunk);
        let quote = word ^ QUOTES;
        let backslash = word ^ BACKSLASHES;
        let found = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (word.wrapping_sub(SPACES) & !word);
        let found = found & HIGH;
        if found != 0 {
            return pos + (found.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    while let Some(&byte) = bytes.get(pos) {
        if byte == b'"' || byte == b'\\' || byte < 0x20 {
            return pos;
        }
        pos += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use crate::gateway::ingest::tests::{assert_same, policy, META};

    /// Valid messages near the scanner's limits: it answers as the reference
    /// does or leaves them to the serde reader.
    #[test]
    fn scanner_edge_cases() {
        let numbers = [
            "0",
            "-0",
            "1",
            "-1",
            "1.0",
            "1E3",
            "1e3",
            "1e-3",
            "0.5",
            "-0.0",
            "4294967295",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "true",
            "false",
            "null",
            "{}",
            "[]",
            "\"\"",
            "\"0\"",
        ];
        let mut scanned = 0;
        for n in numbers {
            for message in [
                format!(
                    r#"[{{"ip":"10.0.0.1","sync_meta":{{"sync_run_id":"r","chunk_index":{n},"total_chunks":2}}}}]"#
                ),
                format!(
                    r#"[{{"ip":"10.0.0.1","sync_meta":{{"sync_run_id":"r","chunk_index":0,"total_chunks":{n}}}}}]"#
                ),
                format!(
                    r#"[{{"ip":"10.0.0.1","sync_meta":{{"sync_run_id":"r","chunk_index":0,"total_chunks":1,"total_devices":{n}}}}}]"#
                ),
                format!(r#"[{{"metadata":{{"armis_device_id":{n}}},"sync_meta":{META}}}]"#),
                format!(r#"[{{"metadata":{n},"sync_meta":{META},"x":{n}}}]"#),
                format!(r#"[{{"sync_meta":{n}}}]"#),
            ] {
                scanned += usize::from(assert_same(message.as_bytes(), &policy()));
            }
        }
        for message in [
            r#"[{"ip":"10.0.0.1","sync_meta":{"sync_run_id":"r\"","chunk_index":0,"total_chunks":1}}]"#,
            r#"[{"ip":"10.0.0.1","sync_meta":{"sync_run_id":"\u0072","chunk_index":0,"total_chunks":1}}]"#,
            r#"[{"i\u0070":"10.0.0.1","sync_meta":{"sync_run_id":"r","chunk_index":0,"total_chunks":1}}]"#,
            r#"[{"ip":"10.0.0.1","sync_meta":{"sync_run_id":"r","chunk_index":0,"total_chunks":1}}, 1]"#,
            r#"[{"ip":"10.0.0.1","x":{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{}}}}}}}}}},"sync_meta":{"sync_run_id":"r","chunk_index":0,"total_chunks":1}}]"#,
            "[]",
            " [ ] ",
            "[{}]",
            "[ {} , { } ]",
        ] {
            scanned += usize::from(assert_same(message.as_bytes(), &policy()));
        }
        assert!(scanned > 60, "the scanner answered {scanned} times");
    }
}
