//! Key strings: `<prefix>_<body>` where body is 43 base62 chars of 32 CSPRNG bytes followed by a
//! 6-char base62 CRC32 of everything before it. The checksum lets `verify_key` reject typos and
//! made-up strings without touching a table, and gives secret scanners a fixed shape to match.

use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// base62 digits needed for 32 bytes: ceil(256 / log2(62)).
pub const RANDOM_CHARS: usize = 43;
pub const CHECKSUM_CHARS: usize = 6;
pub const BODY_CHARS: usize = RANDOM_CHARS + CHECKSUM_CHARS;
pub const MAX_PREFIX_CHARS: usize = 16;
/// Longest possible key string; anything longer is rejected before parsing.
pub const MAX_KEY_CHARS: usize = MAX_PREFIX_CHARS + 1 + BODY_CHARS;
/// Body characters shown in `start` after `<prefix>_`.
const START_BODY_CHARS: usize = 6;

/// Fixed-width big-endian base62: `width` digits, left-padded with '0'.
/// OsRng is used for key material (never a userspace RNG seeded before the postmaster forks).
pub fn base62(bytes: &[u8], width: usize) -> String {
    // Long division of the big-endian number by 62^5 over 32-bit limbs, five digits a pass:
    // byte-wise division by 62 was 3% of create_api_key (perf).
    const CHUNK: u64 = 62 * 62 * 62 * 62 * 62;
    let mut padded = vec![0u8; bytes.len().next_multiple_of(4) - bytes.len()];
    padded.extend_from_slice(bytes);
    let mut limbs: Vec<u32> = padded
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut digits = vec![b'0'; width];
    let mut pos = width;
    while pos > 0 {
        let mut rem = 0u64;
        for limb in limbs.iter_mut() {
            let acc = (rem << 32) | u64::from(*limb);
            *limb = (acc / CHUNK) as u32;
            rem = acc % CHUNK;
        }
        for _ in 0..5 {
            if pos == 0 {
                break;
            }
            pos -= 1;
            digits[pos] = ALPHABET[(rem % 62) as usize];
            rem /= 62;
        }
        debug_assert!(pos > 0 || rem == 0, "width too small for input");
    }
    debug_assert!(limbs.iter().all(|l| *l == 0), "width too small for input");
    // SAFETY of from_utf8: every byte comes from ALPHABET, which is ASCII.
    String::from_utf8(digits).unwrap_or_default()
}

fn checksum(text: &str) -> String {
    base62(
        &crc32fast::hash(text.as_bytes()).to_be_bytes(),
        CHECKSUM_CHARS,
    )
}

/// A prefix is 1–16 characters of `[a-z0-9]`.
pub fn is_valid_prefix(prefix: &str) -> bool {
    (1..=MAX_PREFIX_CHARS).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A new key string with the given (already validated) prefix, and its `start` for display.
pub fn generate(prefix: &str) -> (String, String) {
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut secret);
    let random = base62(&secret, RANDOM_CHARS);
    let start = format!("{prefix}_{}", &random[..START_BODY_CHARS]);
    let head = format!("{prefix}_{random}");
    let sum = checksum(&head);
    (head + &sum, start)
}

/// A random identifier body of `bytes` random bytes, for key ids and token ids.
pub fn random_id(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    OsRng.fill_bytes(&mut raw);
    let width = (bytes * 8 * 1000).div_ceil(5954); // log2(62) ≈ 5.954
    base62(&raw, width)
}

/// A key string that has the right shape and checksum.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub prefix: &'a str,
    pub body: &'a str,
}

impl ParsedKey<'_> {
    /// What is shown for a key: its prefix and the first characters of its body.
    pub fn start(&self) -> String {
        format!("{}_{}", self.prefix, &self.body[..START_BODY_CHARS])
    }
}

/// Parses and checks a key string; `None` for anything that is not a well-formed key.
pub fn parse(key: &str) -> Option<ParsedKey<'_>> {
    if key.len() > MAX_KEY_CHARS || !key.is_ascii() {
        return None;
    }
    let (prefix, body) = key.split_once('_')?;
    if !is_valid_prefix(prefix)
        || body.len() != BODY_CHARS
        || !body.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    let (head, sum) = key.split_at(key.len() - CHECKSUM_CHARS);
    (checksum(head) == sum).then_some(ParsedKey { prefix, body })
}

/// Imported keys of another format: long enough to be a secret, short enough to index.
pub const MIN_FOREIGN_CHARS: usize = 16;
pub const MAX_FOREIGN_CHARS: usize = 256;

/// How a string presented as a key is treated.
#[derive(Debug, PartialEq, Eq)]
pub enum Shape<'a> {
    /// A pg_apikeys key with a valid checksum: worth a lookup.
    Ours(ParsedKey<'a>),
    /// A key of another format, possibly imported with `secret`: worth a lookup.
    Foreign,
    /// Cannot be a key: empty, too short or long, non-printable, or shaped like ours with a bad
    /// checksum (a typo). Rejected without touching a table.
    Invalid,
}

/// True when `key` has our shape, whatever its checksum.
fn has_our_shape(key: &str) -> bool {
    key.split_once('_').is_some_and(|(prefix, body)| {
        is_valid_prefix(prefix)
            && body.len() == BODY_CHARS
            && body.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

pub fn classify(key: &str) -> Shape<'_> {
    if let Some(parsed) = parse(key) {
        return Shape::Ours(parsed);
    }
    let plausible = (MIN_FOREIGN_CHARS..=MAX_FOREIGN_CHARS).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_graphic());
    if plausible && !has_our_shape(key) {
        Shape::Foreign
    } else {
        Shape::Invalid
    }
}

/// What is shown of an imported foreign key: few characters, as it may be short.
pub fn foreign_start(key: &str) -> String {
    key.chars().take(4).collect()
}

/// What the table stores in place of the key.
pub fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn base62_matches_digit_by_digit_division() {
        fn reference(bytes: &[u8], width: usize) -> String {
            let mut num = bytes.to_vec();
            let mut digits = vec![b'0'; width];
            for slot in digits.iter_mut().rev() {
                let mut rem = 0u32;
                for byte in num.iter_mut() {
                    let acc = (rem << 8) | u32::from(*byte);
                    *byte = (acc / 62) as u8;
                    rem = acc % 62;
                }
                *slot = ALPHABET[rem as usize];
            }
            String::from_utf8(digits).unwrap()
        }
        let mut state = 0x9e3779b97f4a7c15u64;
        for len in [1usize, 3, 4, 5, 9, 12, 16, 32] {
            for _ in 0..200 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                let width = (len * 8 * 1000).div_ceil(5954);
                assert_eq!(base62(&bytes, width), reference(&bytes, width), "{bytes:?}");
            }
            let max = vec![0xff; len];
            let width = (len * 8 * 1000).div_ceil(5954);
            assert_eq!(base62(&max, width), reference(&max, width));
        }
    }

    #[test]
    fn base62_is_fixed_width_and_ordered() {
        assert_eq!(base62(&[0], 3), "000");
        assert_eq!(base62(&[61], 2), "0z");
        assert_eq!(base62(&[62], 2), "10");
        assert_eq!(base62(&[0xff; 32], RANDOM_CHARS).len(), RANDOM_CHARS);
        assert_eq!(base62(&u32::MAX.to_be_bytes(), CHECKSUM_CHARS), "4gfFC3");
    }

    #[test]
    fn generated_keys_parse() {
        for prefix in ["sk", "a", "0123456789abcdef"] {
            let (key, start) = generate(prefix);
            assert_eq!(key.len(), prefix.len() + 1 + BODY_CHARS);
            let parsed = parse(&key).expect("generated key parses");
            assert_eq!(parsed.prefix, prefix);
            assert_eq!(parsed.start(), start);
            assert!(start.starts_with(&format!("{prefix}_")));
        }
        assert_ne!(generate("sk").0, generate("sk").0);
    }

    #[test]
    fn any_single_typo_is_rejected() {
        let (key, _) = generate("sk");
        for i in 0..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).unwrap();
            assert!(parse(&typo).is_none(), "typo at {i} accepted: {typo}");
        }
    }

    #[test]
    fn malformed_strings_are_rejected() {
        let (key, _) = generate("sk");
        for bad in [
            "",
            "_",
            "sk_",
            "sk",
            &key[..key.len() - 1],
            &format!("{key}0"),
            &key.to_uppercase(),
            &format!("Sk{}", &key[2..]),
            &key.replacen('_', "-", 1),
            "sk_ééééééééééééééééééééééééééééééééééééééééééééééééé",
            &"x".repeat(1_000_000),
        ] {
            assert!(parse(bad).is_none(), "accepted {bad:.40}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(is_valid_prefix("sk"));
        assert!(is_valid_prefix("live2"));
        for bad in ["", "SK", "s_k", "abcdefghijklmnopq", "ключ", "a b"] {
            assert!(!is_valid_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn classify_separates_typos_from_foreign_keys() {
        let (key, _) = generate("sk");
        assert!(matches!(classify(&key), Shape::Ours(_)));
        let typo = format!(
            "{}{}",
            &key[..key.len() - 1],
            if key.ends_with('a') { 'b' } else { 'a' }
        );
        assert_eq!(classify(&typo), Shape::Invalid);
        assert_eq!(classify("legacy-0123456789abcdef"), Shape::Foreign);
        assert_eq!(classify("nx_live_0123456789abcdef0123"), Shape::Foreign);
        for bad in [
            "",
            "short",
            "has space in it ok",
            "ключключключключключ",
            &"x".repeat(257),
            "tab\there-0123456789",
        ] {
            assert_eq!(classify(bad), Shape::Invalid, "{bad:.20}");
        }
        assert_eq!(foreign_start("legacy-0123456789abcdef"), "lega");
    }

    #[test]
    fn hash_is_sha256() {
        assert_eq!(hash("abc").len(), 32);
        assert_eq!(hash("abc")[..4], [0xba, 0x78, 0x16, 0xbf]);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_checksummed_keys(s in "\\PC{0,80}") {
            if let Some(parsed) = parse(&s) {
                proptest::prop_assert!(is_valid_prefix(parsed.prefix));
                proptest::prop_assert_eq!(parsed.body.len(), BODY_CHARS);
                let (head, sum) = s.split_at(s.len() - CHECKSUM_CHARS);
                proptest::prop_assert_eq!(checksum(head), sum);
            }
        }

        #[test]
        fn near_misses_of_the_key_shape_are_rejected(prefix in "[a-z0-9]{1,16}", body in "[0-9A-Za-z]{49}") {
            // A random body has a 1 in 62^6 chance of a valid checksum; treat a hit as a bug.
            let key = format!("{prefix}_{body}");
            proptest::prop_assert!(parse(&key).is_none());
            proptest::prop_assert_eq!(classify(&key), Shape::Invalid);
        }

        #[test]
        fn classify_never_panics(s in "\\PC{0,300}") {
            let _ = classify(&s);
        }

        #[test]
        fn base62_round_trips_through_its_width(bytes in proptest::collection::vec(proptest::num::u8::ANY, 32)) {
            let text = base62(&bytes, RANDOM_CHARS);
            proptest::prop_assert_eq!(text.len(), RANDOM_CHARS);
            proptest::prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    }

    #[test]
    fn random_ids_have_fixed_width() {
        assert_eq!(random_id(16).len(), 22);
        assert_ne!(random_id(16), random_id(16));
    }
}
