//! Reading one search page: `{"success":…, "message":…, "data":{"next":…,
//! "results":[…], …}}`, with each device handed to a callback as soon as it
//! is parsed (borrowing from the body), so a page never becomes a vector of
//! parsed devices. Unknown keys are skipped.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// The keys this reader looks at (escaped spellings included); any other
/// is skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Key {
    Success,
    Message,
    Data,
    Next,
    Results,
    #[serde(other)]
    Other,
}

/// The page's envelope as read.
#[derive(Debug, Default)]
pub struct PageHead {
    pub success: Option<bool>,
    pub message: Option<String>,
    /// Whether the page has a `data` object at all.
    pub has_data: bool,
    pub next: Option<i64>,
}

/// Parses `body`, calling `each` for every element of `data.results`.
///
/// A body that is not UTF-8 is refused as a whole (JSON is UTF-8, RFC 8259
/// §8.1): serde_json only checks the strings it reads, not those it skips,
/// so a stray byte in an ignored key would pass when the page is read in
/// one pass and fail it when it is read again device by device.
pub fn read_page<'de, T: Deserialize<'de>>(
    body: &'de [u8],
    each: &mut dyn FnMut(T),
) -> serde_json::Result<PageHead> {
    let text = std::str::from_utf8(body).map_err(|e| {
        de::Error::custom(format_args!(
            "the page is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let head = PageSeed { each }.deserialize(&mut de)?;
    de.end()?;
    Ok(head)
}

struct PageSeed<'f, T> {
    each: &'f mut dyn FnMut(T),
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for PageSeed<'_, T> {
    type Value = PageHead;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<PageHead, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for PageSeed<'_, T> {
    type Value = PageHead;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an Armis search page object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PageHead, A::Error> {
        let mut head = PageHead::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Success => head.success = map.next_value()?,
                Key::Message => head.message = map.next_value()?,
                Key::Data => {
                    let data = map.next_value_seed(DataSeed { each: self.each })?;
                    head.has_data = data.is_some();
                    head.next = data.flatten();
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(head)
    }
}

/// `data`: `Some(next)`, with `results` streamed; `None` for `null`.
struct DataSeed<'f, T> {
    each: &'f mut dyn FnMut(T),
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for DataSeed<'_, T> {
    type Value = Option<Option<i64>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for DataSeed<'_, T> {
    type Value = Option<Option<i64>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the data object of an Armis search page")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut next = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Next => next = map.next_value()?,
                Key::Results => map.next_value_seed(ResultsSeed {
                    each: &mut *self.each,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(next))
    }
}

/// `results`: an array (each element to the callback) or `null`.
struct ResultsSeed<'f, T> {
    each: &'f mut dyn FnMut(T),
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for ResultsSeed<'_, T> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for ResultsSeed<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of devices or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element_seed(PhantomData::<T>)? {
            (self.each)(item);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(body: &str) -> serde_json::Result<(PageHead, Vec<i64>)> {
        #[derive(Deserialize)]
        struct Id {
            id: i64,
        }
        let mut ids = Vec::new();
        let head = read_page::<Id>(body.as_bytes(), &mut |d| ids.push(d.id))?;
        Ok((head, ids))
    }

    #[test]
    fn streams_results_and_reads_the_envelope_in_any_order() {
        let (head, got) = ids(
            r#"{"data":{"results":[{"id":1},{"id":2}],"count":2,"next":7,"x":{"next":1}},"success":true,"extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(got, [1, 2]);
        assert_eq!(
            (head.next, head.success, head.has_data),
            (Some(7), Some(true), true)
        );

        let (head, got) = ids(r#"{"data":{"next":null,"results":null}}"#).unwrap();
        assert!(got.is_empty() && head.next.is_none());
        let (head, _) = ids(r#"{"data":null,"success":false,"message":"no"}"#).unwrap();
        assert_eq!(
            (head.success, head.message.as_deref()),
            (Some(false), Some("no"))
        );
        assert!(!head.has_data);
        // Keys spelt with escapes are still recognised.
        let (head, got) = ids(r#"{"d\u0061ta":{"n\u0065xt":3,"results":[{"id":9}]}}"#).unwrap();
        assert_eq!((head.next, got), (Some(3), vec![9]));
    }

    #[test]
    fn wrong_shapes_and_trailing_bytes_are_errors() {
        for bad in [
            r#"{"data":{"results":"x"}}"#,
            r#"{"data":{"next":"5"}}"#,
            r#"[1,2]"#,
            r#"{"data":{"results":[{"id":"one"}]}}"#,
            r#"{"data":{}} trailing"#,
            r#"{"data":{"results":[{"id":1}"#,
        ] {
            assert!(ids(bad).is_err(), "{bad}");
        }
    }

    /// Found by the `armis_page` fuzz target: invalid UTF-8 in a key the
    /// reader skips is refused wherever it is, with its offset.
    #[test]
    fn a_page_that_is_not_utf8_is_refused() {
        let body = b"{\"data\":{\"results\":[{\"id\":1,\"x\":\"\xff\"}]},\"y\":\"\xfe\"}";
        let err = read_page::<IgnoredAny>(body, &mut |_| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains("not UTF-8 (invalid byte at offset 33)"),
            "{err}"
        );
    }
}
