//! Container ids (64 hex digits, as Docker's) and names (given, or `adjective_noun`).

use super::{FrontDoorError, Result};

/// Longest container name.
pub const MAX_NAME_LEN: usize = 128;

const ADJECTIVES: [&str; 32] = [
    "agile", "bold", "brave", "bright", "calm", "clever", "cool", "crisp", "deft", "eager", "fair",
    "fleet", "gentle", "glad", "keen", "kind", "lively", "lucid", "merry", "nimble", "placid",
    "proud", "quick", "quiet", "sleek", "snug", "steady", "sunny", "swift", "tidy", "vivid",
    "witty",
];

const NOUNS: [&str; 32] = [
    "anchovy",
    "barracuda",
    "bass",
    "bream",
    "carp",
    "cod",
    "dace",
    "eel",
    "flounder",
    "grayling",
    "gudgeon",
    "haddock",
    "hake",
    "herring",
    "ide",
    "koi",
    "ling",
    "mackerel",
    "minnow",
    "perch",
    "pike",
    "pollock",
    "roach",
    "rudd",
    "salmon",
    "sardine",
    "shad",
    "smelt",
    "sprat",
    "tench",
    "trout",
    "tuna",
];

/// `n` random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: writing at most `N - got` bytes into our own buffer.
        let r = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), N - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FrontDoorError::Io {
                what: "getrandom".into(),
                source: e,
            });
        }
        got += r as usize;
    }
    Ok(buf)
}

/// A new container id: 64 lowercase hex digits whose 12-digit short form is not all digits
/// (so it is never mistaken for a number, as Docker ensures).
pub fn new_id() -> Result<String> {
    loop {
        let id = hex::encode(random_bytes::<32>()?);
        if !id[..12].bytes().all(|b| b.is_ascii_digit()) {
            return Ok(id);
        }
    }
}

/// True for a full container id.
pub fn is_full_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A generated `adjective_noun` name; `attempt` above 0 adds a digit, as Docker does after a
/// collision.
pub fn generated_name(attempt: usize) -> Result<String> {
    let r = random_bytes::<2>()?;
    let name = format!(
        "{}_{}",
        ADJECTIVES[r[0] as usize % ADJECTIVES.len()],
        NOUNS[r[1] as usize % NOUNS.len()]
    );
    if attempt == 0 {
        Ok(name)
    } else {
        Ok(format!("{name}{}", random_bytes::<1>()?[0] % 10))
    }
}

/// Check a user-given name (a leading `/` is dropped, as Docker does) and return it.
pub fn check_name(name: &str) -> Result<String> {
    let n = name.strip_prefix('/').unwrap_or(name);
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME_LEN
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(n.to_string())
    } else {
        Err(FrontDoorError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex_with_a_non_numeric_short_form() {
        let a = new_id().unwrap();
        let b = new_id().unwrap();
        assert!(is_full_id(&a) && is_full_id(&b));
        assert_ne!(a, b);
        assert!(!a[..12].bytes().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(check_name("/web-1").unwrap(), "web-1");
        assert_eq!(check_name("a.b_c").unwrap(), "a.b_c");
        for bad in ["", "-x", "a b", "a/b", "../x", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let g = generated_name(0).unwrap();
        assert!(check_name(&g).is_ok() && g.contains('_'), "{g}");
    }
}
