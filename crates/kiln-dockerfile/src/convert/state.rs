//! The state of a stage while its instructions are converted.

use std::collections::HashMap;

use kiln_graph::{Input, VertexMeta};
use kiln_types::{Digest, Platform};

use crate::image::ImageConfig;

/// BuildKit's default PATH for Linux, used when the base image defines none.
pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a finished stage hands to stages that use it.
#[derive(Debug, Clone)]
pub(crate) struct StageResult {
    /// The final vertex, `None` for an empty filesystem.
    pub root: Option<Digest>,
    /// The accumulated image config.
    pub config: ImageConfig,
    /// The platform the stage was built for.
    pub platform: Platform,
}

/// A stage in the middle of conversion.
pub(crate) struct StageState {
    /// Display name (`build` or `stage-2`).
    pub name: String,
    /// The stage's platform (its `FROM --platform`, else the target platform).
    pub platform: Platform,
    /// Current filesystem.
    pub root: Option<Digest>,
    /// Current image config.
    pub config: ImageConfig,
    /// ARGs declared in this stage that have a value, in order.
    pub args: Vec<(String, String)>,
    /// The names in `args`, so a new ARG costs no scan of the others.
    pub arg_names: std::collections::HashSet<String>,
    /// A CMD was set in this stage (ENTRYPOINT then keeps it).
    pub cmd_set: bool,
    /// Number of the next vertex-producing instruction, for `[name i/n]`.
    pub cmd_index: usize,
    /// Number of vertex-producing instructions in the stage, FROM included.
    pub cmd_total: usize,
    /// Show the stage name in vertex names (multi-stage files).
    pub show_name: bool,
    /// Show the platform in vertex names (multi-platform builds).
    pub show_platform: bool,
    /// Where each variable is in `config.env` (its last entry), so ENV and lookups cost the
    /// same however many variables the stage has.
    pub env_index: HashMap<String, usize>,
}

/// Variables visible to expansion: ENV, else the stage's ARGs (ENV wins).
impl crate::shell::Env for StageState {
    fn get(&self, name: &str) -> Option<String> {
        match self.env_get(name) {
            Some(value) => Some(value.to_owned()),
            None if self.arg_names.contains(name) => {
                self.args.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            }
            None => None,
        }
    }
}

impl StageState {
    /// Indexes `config.env` after the config was replaced (a new stage's base).
    pub fn index_env(&mut self) {
        self.env_index.clear();
        for (i, entry) in self.config.env.iter().enumerate() {
            let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
            self.env_index.insert(key.to_owned(), i);
        }
    }

    /// The value of an ENV variable.
    pub fn env_get(&self, key: &str) -> Option<&str> {
        let entry = &self.config.env[*self.env_index.get(key)?];
        Some(entry.split_once('=').map_or("", |(_, v)| v))
    }

    /// Sets an ENV variable, replacing an earlier value in place.
    pub fn env_set(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self.env_index.get(key) {
            Some(&i) => self.config.env[i] = entry,
            None => {
                self.env_index.insert(key.to_owned(), self.config.env.len());
                self.config.env.push(entry);
            }
        }
    }

    /// Declares an ARG (`None`: without a value), moving it after the others.
    pub fn arg_set(&mut self, key: &str, value: Option<String>) {
        if self.arg_names.remove(key) {
            self.args.retain(|(k, _)| k != key);
        }
        if let Some(value) = value {
            self.arg_names.insert(key.to_owned());
            self.args.push((key.to_owned(), value));
        }
    }

    /// The bytes of the stage's variables.
    pub fn variables_len(&self) -> usize {
        self.config.env.iter().map(String::len).sum::<usize>()
            + self.args.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }

    /// The environment of a RUN: the image env plus ARGs it does not define, and PATH.
    pub fn run_env(&self) -> Vec<String> {
        let mut env = self.config.env.clone();
        for (k, v) in &self.args {
            if self.env_get(k).is_none() {
                env.push(format!("{k}={v}"));
            }
        }
        if !env.iter().any(|kv| kv.starts_with("PATH=")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        env
    }

    /// The root filesystem as an op input, given the vertex inputs being assembled.
    pub fn root_input(&self, inputs: &mut Vec<Digest>) -> Input {
        match self.root {
            Some(d) => input_index(inputs, d),
            None => Input::Scratch,
        }
    }

    /// Metadata for the next vertex-producing instruction, advancing the counter.
    pub fn next_meta(&mut self, text: &str, lines: (usize, usize)) -> VertexMeta {
        self.cmd_index += 1;
        VertexMeta {
            name: format!("{}{text}", self.prefix()),
            stage: Some(self.name.clone()),
            platform: Some(self.platform.clone()),
            lines: Some(lines),
        }
    }

    /// Metadata for a vertex outside the `[i/n]` numbering (sources, heredoc files). Only
    /// platform-specific vertices record the stage's platform.
    pub fn unnumbered_meta(&self, name: String, platform_specific: bool, lines: Option<(usize, usize)>) -> VertexMeta {
        VertexMeta {
            name,
            stage: Some(self.name.clone()),
            platform: platform_specific.then(|| self.platform.clone()),
            lines,
        }
    }

    fn prefix(&self) -> String {
        let mut parts = Vec::new();
        if self.show_platform {
            parts.push(self.platform.to_string());
        }
        if self.show_name {
            parts.push(self.name.clone());
        }
        let width = self.cmd_total.to_string().len();
        parts.push(format!("{:>width$}/{}", self.cmd_index, self.cmd_total));
        format!("[{}] ", parts.join(" "))
    }

    /// Resolves a path against the working directory, as WORKDIR and COPY destinations do.
    pub fn resolve_path(&self, path: &str) -> String {
        let base = if self.config.working_dir.is_empty() { "/" } else { &self.config.working_dir };
        let joined = if path.starts_with('/') { path.to_owned() } else { format!("{base}/{path}") };
        clean_absolute(&joined)
    }
}

/// Adds `digest` to `inputs` (once) and returns its index.
pub(crate) fn input_index(inputs: &mut Vec<Digest>, digest: Digest) -> Input {
    match inputs.iter().position(|d| *d == digest) {
        Some(i) => Input::Index(i),
        None => {
            inputs.push(digest);
            Input::Index(inputs.len() - 1)
        }
    }
}

/// Cleans an absolute path: `.` and `..` resolved, no trailing slash (except `/`).
pub(crate) fn clean_absolute(path: &str) -> String {
    format!("/{}", crate::context::clean_relative(path))
}
