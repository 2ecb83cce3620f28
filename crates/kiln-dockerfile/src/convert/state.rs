//! The state of a stage while its instructions are converted.

use std::collections::HashMap;

use kiln_graph::{Input, VertexMeta};
use kiln_types::{Digest, Platform};

use super::env::EnvList;
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
    /// The build state's environment (ENV and ARG values), which `FROM <stage>` inherits.
    pub env: EnvList,
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
    /// The build state's environment: what RUN steps get and expansions read.
    pub env: EnvList,
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
    /// Where each variable is in `config.env`, so an ENV costs the same however many
    /// variables the image has.
    pub config_env_index: HashMap<String, usize>,
}

/// Variables visible to expansion: the build state's environment.
impl crate::shell::Env for StageState {
    fn get(&self, name: &str) -> Option<String> {
        self.env.get(name).map(str::to_owned)
    }
}

impl StageState {
    /// Sets up the environment once the stage's base is known, as BuildKit does: the image
    /// config gets the default PATH when it has none, and the build state's environment
    /// (`inherited`: empty, or the parent stage's with its ARG values) gets every config
    /// variable set again, in the config's order.
    pub fn start_env(&mut self, inherited: EnvList) {
        self.config_env_index.clear();
        for (i, entry) in self.config.env.iter().enumerate() {
            let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
            self.config_env_index.insert(key.to_owned(), i);
        }
        if !self.config_env_index.contains_key("PATH") {
            self.config_env_set("PATH", DEFAULT_PATH);
        }
        self.env = inherited;
        for entry in &self.config.env {
            let (key, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
            self.env.set(key, value);
        }
    }

    /// ENV: the variable goes into the image config (replacing an earlier value in place) and
    /// the build state's environment (after every other variable).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.config_env_set(key, value);
        self.env.set(key, value);
    }

    fn config_env_set(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self.config_env_index.get(key) {
            Some(&i) => self.config.env[i] = entry,
            None => {
                self.config_env_index.insert(key.to_owned(), self.config.env.len());
                self.config.env.push(entry);
            }
        }
    }

    /// The environment of a RUN.
    pub fn run_env(&self) -> Vec<String> {
        self.env.to_vec()
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
