//! Generated run names: `<adjective>-<animal>-<n>`, as dstack names runs.

const ADJECTIVES: &[&str] = &[
    "brave", "calm", "clever", "cool", "eager", "fancy", "gentle", "happy", "jolly", "kind",
    "lucky", "mighty", "nimble", "proud", "quick", "quiet", "shiny", "silly", "swift", "witty",
];

const ANIMALS: &[&str] = &[
    "badger", "bat", "bear", "cat", "crab", "deer", "dodo", "eagle", "fox", "frog", "goat", "hawk",
    "lion", "lizard", "mole", "moth", "otter", "owl", "panda", "seal", "swan", "wolf",
];

/// The `<adjective>-<animal>-` prefix picked by a seed (e.g. random bits).
pub fn prefix(seed: u64) -> String {
    let adjective = ADJECTIVES[(seed % ADJECTIVES.len() as u64) as usize];
    let animal = ANIMALS[((seed / 97) % ANIMALS.len() as u64) as usize];
    format!("{adjective}-{animal}-")
}

/// The first `<prefix><n>` (n ≥ 1) not in `taken`.
pub fn generate(prefix: &str, taken: &[String]) -> String {
    (1..)
        .map(|n| format!("{prefix}{n}"))
        .find(|name| !taken.contains(name))
        .unwrap_or_else(|| prefix.trim_end_matches('-').to_string())
}

/// Whether `name` is a valid resource name: `^[a-z][a-z0-9-]{1,40}$`.
pub fn is_valid(name: &str) -> bool {
    let b = name.as_bytes();
    (2..=41).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_free_number() {
        assert_eq!(prefix(0), "brave-badger-");
        let a = generate(&prefix(0), &[]);
        assert_eq!(a, "brave-badger-1");
        assert_eq!(generate(&prefix(0), &[a]), "brave-badger-2");
        assert!(is_valid("my-run-1"));
        assert!(!is_valid("My_Run"));
        assert!(!is_valid("a"));
    }
}
