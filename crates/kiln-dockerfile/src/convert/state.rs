//! The state of a stage while its instructions are converted.

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
}

impl StageState {
    /// Variables visible to expansion: stage ARGs, overridden by ENV (ENV wins).
    pub fn expansion_env(&self) -> Vec<(String, String)> {
        let mut env = self.args.clone();
        env.extend(self.config.env.iter().filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        }));
        env
    }

    /// The environment of a RUN: the image env plus ARGs it does not define, and PATH.
    pub fn run_env(&self) -> Vec<String> {
        let mut env = self.config.env.clone();
        for (k, v) in &self.args {
            if self.config.env_get(k).is_none() {
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
