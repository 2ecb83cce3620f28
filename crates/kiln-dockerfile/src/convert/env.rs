//! The environment of a stage's build state, kept as BuildKit's `llb.EnvList` keeps it: ENV
//! and ARG values in the order they were last set (setting a variable again moves it to the
//! end), the last value winning. RUN steps get it as their environment and expansions read
//! it; the image config's `Env` is separate and holds ENV values only.

use std::collections::HashMap;

/// Ordered variables with move-to-end replacement, each operation amortised O(1).
#[derive(Debug, Clone, Default)]
pub(crate) struct EnvList {
    /// Entries in order; a replaced entry leaves a hole until the next compaction.
    entries: Vec<Option<(String, String)>>,
    /// Where each variable's live entry is.
    index: HashMap<String, usize>,
}

impl EnvList {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.index.get(key).and_then(|&i| self.entries[i].as_ref()).map(|(_, v)| v.as_str())
    }

    /// Sets `key`, after every other variable.
    pub fn set(&mut self, key: &str, value: &str) {
        if let Some(old) = self.index.insert(key.to_owned(), self.entries.len()) {
            self.entries[old] = None;
        }
        self.entries.push(Some((key.to_owned(), value.to_owned())));
        if self.entries.len() > 2 * self.index.len() + 16 {
            self.compact();
        }
    }

    /// `KEY=VALUE` strings, in order.
    pub fn to_vec(&self) -> Vec<String> {
        self.entries.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// The bytes of every name and value.
    pub fn byte_len(&self) -> usize {
        self.entries.iter().flatten().map(|(k, v)| k.len() + v.len()).sum()
    }

    fn compact(&mut self) {
        self.entries.retain(Option::is_some);
        for (i, (key, _)) in self.entries.iter().flatten().enumerate() {
            self.index.insert(key.clone(), i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_again_moves_a_variable_to_the_end_and_holes_are_compacted() {
        let mut env = EnvList::default();
        env.set("PATH", "/bin");
        env.set("A", "1");
        env.set("PATH", "/usr/bin");
        assert_eq!(env.to_vec(), ["A=1", "PATH=/usr/bin"]);
        for n in 0..1000 {
            env.set("A", &n.to_string());
        }
        assert_eq!(env.to_vec(), ["PATH=/usr/bin", "A=999"]);
        assert!(env.entries.len() <= 2 * 2 + 16);
        assert_eq!((env.get("A"), env.get("B")), (Some("999"), None));
    }
}
